"""`mgd run`'s options and typed config, and every user error as one line with a non-zero
exit (no stage runs in any of these tests)."""
import dataclasses
import importlib.metadata
import json
import tomllib
import typing

import pytest

import mgd
from mgd import cli
from mgd.errors import UsageError
from mgd.pipeline import config, presets
from mgd.pipeline.model import GPTConfig
from mgd.pipeline.run import prepare, resolve_sources
from tests.pipeline.shared_data import DATA, needs_data

HUB = ["--ontarget", "hf:a:b:c", "--offtarget", "hf:d:e:f"]


def _error(capsys, argv, code=2):
    """Run `mgd ARGV`, expect exit `code` and exactly one line on stderr besides the
    progress log's `[mgd ...]` lines; return it."""
    assert cli.main(argv) == code
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("[mgd ")]
    assert len(err) == 1, err
    assert err[0].startswith("mgd: ")
    return err[0]


def _config(*argv, env=None):
    args = cli.build_parser().parse_args(["run", *argv])
    return prepare(cli.build_config(args), env={} if env is None else env)


# ------------------------------------------------------------------ the typed config

def test_model_section_is_gptconfig_without_the_corpus_fields():
    want = {f.name: (f.default, typing.get_type_hints(GPTConfig)[f.name])
            for f in dataclasses.fields(GPTConfig) if f.name not in ("vocab_size", "seq_len")}
    got = {f.name: (f.default, typing.get_type_hints(config.ModelConfig)[f.name])
           for f in dataclasses.fields(config.ModelConfig)}
    assert got == want


def test_presets_keep_their_settings():
    """The values every preset had before the config was typed (the smoke pin checks the
    smoke preset end to end; these check the others field by field)."""
    for name in presets.PRESETS:
        p = presets.get(name)
        assert (p.seeds, p.selection.budget_fraction, p.selection.budget_tokens) == (3, 0.1, None)
        assert (p.selection.target_modes, p.selection.target_gate) == (4, 0.99)
        assert presets.INFO[name].expected_time
        config.validate(p)
    # The smoke preset runs the default methods (its results are pinned); demo and full
    # every method, the similarity baselines and the ablations included.
    assert presets.smoke().selection.methods == config.DEFAULT_METHODS
    assert not presets.smoke().baselines.dsir.draw_per_seed
    for name in ("demo", "full"):
        p = presets.get(name)
        assert p.selection.methods == config.METHODS and p.baselines.dsir.draw_per_seed
    assert set(config.METHODS) == set(config.DEFAULT_METHODS) | set(
        config.SIMILARITY_BASELINES) | set(config.ABLATIONS)
    demo = presets.demo()
    assert (demo.oracle.k, demo.oracle.inner_lr, demo.oracle.rounds, demo.oracle.pool_size) == \
        (256, 3e-5, 256, 8192)
    assert demo.scorer.gradient_alignment and (demo.scorer.feature_batch, demo.loss_batch) == (512, 512)
    full = presets.full()
    assert (full.oracle.micro_batch, full.corpus.max_docs, full.scorer.holdout_fraction) == \
        (128, 1_000_000, 0.1)
    mid, smoke = presets.mid(), presets.smoke()
    assert "mid" not in presets.PRESETS and mid.name == "mid"
    assert (mid.corpus, mid.scorer) == (smoke.corpus, smoke.scorer) and mid.model.n_layer == 3
    assert mid.oracle.rounds == 96


@pytest.mark.parametrize("path,text,want", [
    ("oracle.k", "32", 32), ("oracle.inner_lr", "3e-5", 3e-5), ("oracle.micro_batch", "none", None),
    ("oracle.micro_batch", "8", 8), ("scorer.gradient_alignment", "true", True),
    ("scorer.gradient_alignment", "off", False), ("selection.budget_tokens", "2e6", 2_000_000),
    ("selection.methods", "random, dsir", ("random", "dsir")), ("model.attention_impl", "xla", "xla"),
    ("baselines.population.n_models", "5", 5), ("seeds", "4", 4), ("corpus.max_docs", "none", None),
])
def test_set_parses_by_the_fields_type(path, text, want):
    cfg = config.apply_overrides(presets.smoke(), [config.parse_assignment(f"{path}={text}")])
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    assert value == want and type(value) is type(want)
    # Nothing else moved.
    rest = config.apply_overrides(cfg, [(path, getattr(
        _walk(presets.smoke(), path), path.split(".")[-1]))])
    assert rest == presets.smoke()


def _walk(obj, path):
    for part in path.split(".")[:-1]:
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("text,words", [
    ("oracle.kk=3", ["oracle", "no field 'kk'", "inner_steps"]),
    ("orcle.k=3", ["the run config", "no field 'orcle'", "oracle"]),
    ("oracle.k=x", ["oracle.k", "an integer", "'x'"]),
    ("oracle.k=0", ["OracleConfig.k must be >= 1"]),
    ("oracle=3", ["oracle is a section"]),
    ("seeds.x=3", ["seeds is an integer, not a section"]),
    ("scorer.gradient_alignment=maybe", ["scorer.gradient_alignment", "boolean"]),
    ("oracle.k", ["expected SECTION.FIELD=VALUE"]),
    ("oracle..k=3", ["not a dotted field path"]),
])
def test_set_errors_name_the_setting(capsys, text, words):
    line = _error(capsys, ["run", *HUB, "--dry-run", "--set", text])
    assert line.startswith("mgd: error: ") and all(w in line for w in words), line


def test_config_file_and_dry_run_round_trip(tmp_path, capsys):
    """--dry-run prints TOML that --config reads back to the same config; the options and
    --set apply over the file, --set last."""
    assert cli.main(["run", *HUB, "--dry-run", "--set", "oracle.rounds=7",
                     "--budget-tokens", "2e4"]) == 0
    out = capsys.readouterr().out
    data = tomllib.loads(out)
    assert data["oracle"]["rounds"] == 7 and data["selection"]["budget_tokens"] == 20000
    assert data["selection"]["budget_fraction"] == "none"
    assert data["baselines"]["dsir"]["num_buckets"] == 2048
    file = tmp_path / "run.toml"
    file.write_text(out)
    again = _config("--config", str(file))
    assert again == _config(*HUB, "--set", "oracle.rounds=7", "--budget-tokens", "2e4")
    over = _config("--config", str(file), "--seeds", "5", "--set", "seeds=6", "--set", "oracle.k=16")
    assert (over.seeds, over.oracle.k, over.oracle.rounds) == (6, 16, 7)


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[oracle\nk = 3\n")
    assert "not valid TOML" in _error(capsys, ["run", "--config", str(bad), "--dry-run"])
    typo = tmp_path / "typo.toml"
    typo.write_text("[oracle]\nkk = 3\n")
    assert "no field 'kk'" in _error(capsys, ["run", "--config", str(typo), "--dry-run"])
    assert "no such file" in _error(capsys, ["run", "--config", str(tmp_path / "no.toml")])


def test_budget_options_say_what_they_are():
    fraction = _config(*HUB, "--budget-fraction", "0.05").selection
    tokens = _config(*HUB, "--budget-tokens", "2e4").selection
    assert (fraction.budget_fraction, fraction.budget_tokens) == (0.05, None)
    assert (tokens.budget_fraction, tokens.budget_tokens) == (None, 20000)
    with pytest.raises(UsageError, match="exactly one"):
        _config(*HUB, "--set", "selection.budget_tokens=100")
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for option in ("--budget-fraction", "--budget-tokens", "--set", "--config", "--dry-run",
                   "--yes", "--attention-impl", "--seeds", "--quiet"):
        assert option in help_text
    assert "--budget " not in help_text and "per-unit" not in help_text


def test_plan_is_the_config_as_json_and_names_its_differences():
    a = config.to_plan(_config(*HUB))
    b = config.to_plan(_config(*HUB, "--set", "oracle.k=16", "--seeds", "4"))
    assert json.loads(json.dumps(a)) == a and a["scorer"]["regressors"] == ["ridge", "mlp"]
    assert config.plan_differences(a, b) == ["oracle.k", "seeds"]
    assert config.plan_differences(a, a) == []


def test_sources_resolve_from_arguments_env_or_hub(tmp_path):
    (tmp_path / "ontarget.jsonl.gz").write_bytes(b"")
    (tmp_path / "offtarget.jsonl.gz").write_bytes(b"")
    smoke = presets.smoke()
    got = resolve_sources(smoke, env={}).corpus
    assert (got.ontarget, got.offtarget) == (presets.HUB_ONTARGET, presets.HUB_OFFTARGET)
    got = resolve_sources(smoke, env={"MGD_DATA_DIR": str(tmp_path)}).corpus
    assert (got.ontarget, got.offtarget) == (str(tmp_path / "ontarget.jsonl.gz"),
                                             str(tmp_path / "offtarget.jsonl.gz"))
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "x"}\n')
    cfg = config.apply_overrides(smoke, [("corpus.ontarget", str(mine))])
    assert resolve_sources(cfg, env={"MGD_DATA_DIR": str(tmp_path)}).corpus.ontarget == str(mine)
    with pytest.raises(UsageError, match="MGD_DATA_DIR"):
        resolve_sources(smoke, env={"MGD_DATA_DIR": str(tmp_path / "missing")})


def test_version():
    assert mgd.__version__ == importlib.metadata.version("metagrad-distill")


def test_version_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mgd {mgd.__version__}"


@pytest.mark.parametrize("argv,says", [(["--help"], "usage: mgd"), (["--version"], "mgd 0"),
                                       ([], "mgd: error:")])
def test_help_and_version_do_not_import_jax(argv, says):
    """`mgd --help` and `mgd --version` start fast: a fresh interpreter, JAX never imported."""
    import subprocess
    import sys
    code = (f"import sys\nfrom mgd import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n"
            "    pass\nprint('JAX' if 'jax' in sys.modules else 'NOJAX')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "NOJAX", out.stdout + out.stderr
    assert says in out.stdout + out.stderr


# ------------------------------------------------------------------ user errors, one line each

@pytest.mark.parametrize("argv,words", [
    (["--budget-fraction", "0"], ["--budget-fraction", "(0, 1]"]),
    (["--budget-fraction", "1.5"], ["--budget-fraction"]),
    (["--budget-tokens", "0.5"], ["--budget-tokens", "whole number"]),
    (["--budget-fraction", "0.1", "--budget-tokens", "100"], ["not allowed with"]),
    (["--budget", "0.1"], ["--budget"]),
    (["--seeds", "0"], ["--seeds", ">= 1"]),
    (["--preset", "huge"], ["--preset", "huge"]),
    (["--set", "selection.target_modes=65"], ["selection.target_modes", "64"]),
    (["--set", "selection.target_gate=1.5"], ["selection.target_gate"]),
    (["--set", "selection.methods=nope"], ["selection.methods", "nope", "dsir"]),
    (["--attention-impl", "nope"], ["--attention-impl nope", "auto, xla, pallas, triton, cuda"]),
    (["--set", "model.n_head=3"], ["model:", "divisible"]),
    (["--set", "selection.knn_k=0"], ["selection.knn_k", "64"]),
    (["--target", "t.jsonl", "--target-source", "x"], ["--target and --target-source", "one"]),
    (["--target-source", "EBM"], ["--target-source EBM", "local on-target file"]),
])
def test_bad_options_give_one_line_before_anything_runs(capsys, tmp_path, argv, words):
    out = tmp_path / "run"
    line = _error(capsys, ["run", *HUB, "--out", str(out), *argv])
    assert all(w in line for w in words), line
    assert not out.exists()


def test_missing_corpus_file_is_named(tmp_path, capsys):
    line = _error(capsys, ["run", "--ontarget", str(tmp_path / "nope.jsonl"), "--offtarget",
                           "hf:d:e:f", "--out", str(tmp_path / "run")])
    assert "--ontarget" in line and "nope.jsonl" in line and "no such file" in line
    line = _error(capsys, ["run", *HUB, "--target", str(tmp_path / "t.jsonl")])
    assert "--target" in line and "t.jsonl" in line


def test_malformed_corpus_file_is_named(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    monkeypatch.delenv("MGD_DATA_DIR", raising=False)
    line = _error(capsys, ["run", "--ontarget", str(bad), "--offtarget", str(bad), "--out",
                           str(tmp_path / "run"), "--no-progress"])
    assert "bad.jsonl:2: malformed JSON" in line
    # Nothing was pinned: the corrected command may use the same folder.
    assert not (tmp_path / "run" / "plan.json").exists()


def test_offline_without_a_corpus_says_how_to_point_at_one(tmp_path, capsys, monkeypatch):
    import sys
    import types

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the hub")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    monkeypatch.delenv("MGD_DATA_DIR", raising=False)
    line = _error(capsys, ["run", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "MedRAG/pubmed" in line and "--ontarget/--offtarget" in line and "MGD_DATA_DIR" in line
    assert not (tmp_path / "run" / "plan.json").exists()


def test_out_at_a_file(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    line = _error(capsys, ["run", *HUB, "--out", str(file)])
    assert "--out" in line and "is a file" in line


def test_cuda_without_a_gpu_names_the_missing_gpu(tmp_path, capsys):
    from mgd.devices import gpu_unavailable_reason
    if gpu_unavailable_reason() is None:
        pytest.skip("this machine has a GPU")
    line = _error(capsys, ["run", *HUB, "--attention-impl", "cuda", "--out", str(tmp_path / "r")])
    assert "--attention-impl cuda" in line and "GPU" in line and "dtype" not in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("preset", ["demo", "full"])
def test_gpu_presets_on_a_cpu_ask_for_yes(tmp_path, capsys, preset):
    from mgd.devices import gpu_unavailable_reason
    if gpu_unavailable_reason() is None:
        pytest.skip("this machine has a GPU")
    line = _error(capsys, ["run", *HUB, "--preset", preset, "--out", str(tmp_path / "r")])
    assert f"--preset {preset}" in line and "H200" in line and "--yes" in line
    # --dry-run shows the settings on any machine.
    assert cli.main(["run", *HUB, "--preset", preset, "--dry-run"]) == 0


def test_a_different_plan_in_out_is_refused_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    plan = config.to_plan(_config(*HUB))
    (out / "plan.json").write_text(json.dumps({**plan, "seeds": 9}))
    line = _error(capsys, ["run", *HUB, "--out", str(out)])
    assert "different settings (seeds)" in line


def test_ctrl_c_says_the_same_command_resumes(monkeypatch, capsys, tmp_path):
    from mgd.pipeline import run as run_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_mod, "run_prepared", interrupted)
    line = _error(capsys, ["run", *HUB, "--out", str(tmp_path / "r")], code=130)
    assert "stopped" in line and "same command" in line and "resume" in line


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    from mgd.pipeline import run as run_mod

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(run_mod, "run_prepared", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["run", *HUB, "--out", str(tmp_path / "r")])



def test_the_cli_prepares_the_config_once(monkeypatch, tmp_path):
    # Preparing reads the sources (all of the on-target file for --target-source).
    from mgd.pipeline import run as run_mod
    calls, ran = [], []
    prepare = run_mod.prepare

    def counted(cfg, env=None):
        calls.append(cfg)
        return prepare(cfg, env)
    monkeypatch.setattr(run_mod, "prepare", counted)
    monkeypatch.setattr(run_mod, "run_prepared", lambda cfg, *a, **k: ran.append(cfg))
    assert cli.main(["run", *HUB, "--out", str(tmp_path / "r")]) == 0
    assert len(calls) == 1 and len(ran) == 1
    assert ran[0] == prepare(calls[0])

@needs_data
def test_dry_run_runs_nothing_and_shows_the_resolved_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MGD_DATA_DIR", str(DATA))
    assert cli.main(["run", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    data = tomllib.loads(capsys.readouterr().out)
    assert data["corpus"]["ontarget"] == str(DATA / "ontarget.jsonl.gz")
    assert not (tmp_path / "r").exists()
