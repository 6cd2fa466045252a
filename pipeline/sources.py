"""Where documents come from: local JSON-lines files or the Hugging Face hub.

Both return a plain list of strings, so the corpus builder does not care which.
"""
from __future__ import annotations

import gzip
import io
import itertools
import json
from pathlib import Path

from mgd.errors import UsageError

__all__ = ["read_jsonl", "stream_hub", "read_source", "source_counts", "resolve_source_name",
           "HubUnavailable", "SourceMissing", "MalformedSource", "POINT_AT_A_CORPUS",
           "SOURCE_FIELD"]

SOURCE_FIELD = "source"     # the field that names where a document comes from

POINT_AT_A_CORPUS = ("give --ontarget/--offtarget files or set MGD_DATA_DIR to a folder with "
                     "ontarget.jsonl.gz and offtarget.jsonl.gz")


# A user's corpus problem is a UsageError (one line from the CLI); each keeps the builtin
# base that callers of these functions already catch.
class HubUnavailable(UsageError, RuntimeError):
    """The hub could not be reached or the dataset could not be opened."""


class SourceMissing(UsageError, FileNotFoundError):
    """A corpus file that does not exist."""


class MalformedSource(UsageError, ValueError):
    """A corpus file that cannot be read as JSON lines with the asked-for field."""


def _json_lines(path: Path):
    """(line number, object) of each non-blank line of a .jsonl or .jsonl.gz file.
    SourceMissing or MalformedSource naming the file and line."""
    if not path.is_file():
        raise SourceMissing(f"corpus file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MalformedSource(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as err:
        # A truncated gzip stream or bad bytes surface here, after `lineno` good lines.
        raise MalformedSource(f"{path}:{lineno + 1}: cannot read ({type(err).__name__}: {err})") from err


def read_jsonl(path, field: str = "text", limit: int | None = None, *,
               only_source: str | None = None, skip_source: str | None = None) -> list[str]:
    """The `field` of each JSON object in a .jsonl or .jsonl.gz file, in file order.

    Blank lines are skipped. `limit` stops after that many documents (the shared
    corpora are tens of MB; tests read a slice). `only_source` / `skip_source` keep only
    the documents whose `source` field is / is not that value (`limit` counts the kept
    ones). Errors name the file and line.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    texts: list[str] = []
    if limit == 0:
        if not path.is_file():
            raise SourceMissing(f"corpus file not found: {path}")
        return texts
    for lineno, obj in _json_lines(path):
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise MalformedSource(f"{path}:{lineno}: no field {field!r} (found {keys})")
        if only_source is not None or skip_source is not None:
            src = obj.get(SOURCE_FIELD)
            if (only_source is not None and src != only_source) or \
                    (skip_source is not None and src == skip_source):
                continue
        text = obj[field]
        if not isinstance(text, str):
            raise MalformedSource(f"{path}:{lineno}: field {field!r} is "
                                  f"{type(text).__name__}, expected a string")
        texts.append(text)
        # Stop before reading further: lines past the limit are never parsed.
        if limit is not None and len(texts) >= limit:
            break
    return texts


def stream_hub(dataset: str, config: str | None, field: str, split: str = "train",
               limit: int = 10_000) -> list[str]:
    """The first `limit` values of `field` from a hub dataset, streamed (no full download).

    E.g. `stream_hub("allenai/c4", "en", "text")` or
    `stream_hub("MedRAG/pubmed", None, "contents")`.
    """
    if limit is None or limit <= 0:
        raise ValueError(f"limit must be a positive count when streaming, got {limit}")
    try:
        import datasets
    except ImportError as err:
        raise HubUnavailable("streaming from the hub needs the `datasets` package "
                             "(pip install 'metagrad-distill[pipeline]')") from err
    where = f"{dataset}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
    try:
        ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
        rows = list(itertools.islice(iter(ds), limit))
    except Exception as err:  # datasets raises many types for "offline" and "not found"
        raise HubUnavailable(
            f"cannot stream {where} from the Hugging Face hub ({type(err).__name__}); "
            f"offline, point the corpus at local .jsonl/.jsonl.gz files (field 'text'): "
            f"{POINT_AT_A_CORPUS}") from err
    texts = []
    for i, row in enumerate(rows):
        if field not in row:
            raise MalformedSource(f"{where}: row {i} has no field {field!r} (found {sorted(row)})")
        texts.append(str(row[field]))
    return texts


def source_counts(path) -> dict[str, int]:
    """{value of the `source` field: documents} of a .jsonl or .jsonl.gz file, in order of
    first appearance (documents without the field count under "")."""
    counts: dict[str, int] = {}
    for _, obj in _json_lines(Path(str(path).partition("#")[0])):
        src = str(obj.get(SOURCE_FIELD, "")) if isinstance(obj, dict) else ""
        counts[src] = counts.get(src, 0) + 1
    return counts


def resolve_source_name(spec: str, name: str, option: str = "--target-source") -> str:
    """The value of the `source` field in the file `spec` that `name` stands for: itself,
    else the one source it begins (case-insensitively). UsageError listing the sources
    present otherwise."""
    if spec.startswith("hf:"):
        raise UsageError(f"{option} {name}: needs a local on-target file whose documents have "
                         f"a {SOURCE_FIELD!r} field, not the hub source {spec}")
    counts = source_counts(spec)
    named = {k: v for k, v in counts.items() if k}
    if name in named:
        return name
    matches = [k for k in named if k.lower().startswith(name.lower())]
    if len(matches) == 1:
        return matches[0]
    present = "; ".join(f"{k!r} ({v} documents)" for k, v in named.items()) or "none"
    why = "matches several sources" if matches else "is not a source of"
    raise UsageError(f"{option} {name}: {why} {spec.partition('#')[0]}; sources present "
                     f"(field {SOURCE_FIELD!r}): {present}")


def read_source(spec: str, limit: int | None = None, *, only_source: str | None = None,
                skip_source: str | None = None) -> list[str]:
    """A corpus source from one string: a file path, or `hf:<dataset>:<config>:<field>`.

    `hf:allenai/c4:en:text`, `hf:MedRAG/pubmed::contents` (empty config). A file
    path may end in `#field` to read a field other than `text`. `only_source` /
    `skip_source` filter a file's documents by their `source` field (`read_jsonl`).
    """
    if spec.startswith("hf:") and (only_source is not None or skip_source is not None):
        raise MalformedSource(f"{spec}: filtering by the {SOURCE_FIELD!r} field needs a local "
                              f"file, not a hub source")
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) != 3 or not parts[0] or not parts[2]:
            raise MalformedSource(f"hub source must read 'hf:<dataset>:<config>:<field>', got {spec!r}")
        dataset, config, field = parts
        return stream_hub(dataset, config or None, field, limit=limit or 10_000)
    path, _, field = spec.partition("#")
    return read_jsonl(path, field=field or "text", limit=limit, only_source=only_source,
                      skip_source=skip_source)
