"""Bad input and faults through the real `evomerge` CLI: one clear ``error: ...``, exit status 2, no
traceback, nothing left under the output's final name or as a temporary folder.

Every case runs real components: tiny safetensors checkpoints damaged on purpose, real filesystems
(tmpfs mounts where this process may mount them, else the case is skipped; ``RLIMIT_FSIZE`` /
``RLIMIT_AS`` in a subprocess where no mount is needed), real processes killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.tiny import build_tiny_family

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "evals" / "zoo_demo.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_family(tmp_path_factory.mktemp("fam"), n_experts=2, noise=0.05, num_layers=3)


def recipe(path: Path, *models: Path, **extra) -> Path:
    data = {"kind": "merge", "method": "linear",
            "sources": [{"model": str(m), "params": {"weight": 0.5}} for m in models], **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def good(tmp_path, fam) -> Path:
    return recipe(tmp_path / "r.yaml", fam["expert1"], fam["expert2"])


def cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in this process; (exit status, stderr). Never a traceback."""
    rc, _, err = cli_out(capsys, *argv)
    return rc, err


def cli_out(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit status, stdout, stderr). Never a traceback."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return rc, captured.out, captured.err


def cli_proc(*argv, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a process; never a traceback."""
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", *map(str, argv)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    return r


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size, ro=False)``: a real tmpfs of ``size`` mounted at tmp_path/name (skipped
    where this process may not mount), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str, ro: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            pytest.skip(f"mount not permitted here: {r.stderr.strip()}")
        mounted.append(where)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def with_big_tokenizer(src: Path, dst: Path, size: int) -> Path:
    """A copy of model ``src`` whose tokenizer.json is padded (valid JSON) to ``size`` bytes."""
    shutil.copytree(src, dst)
    tok = dst / "tokenizer.json"
    text = tok.read_text()
    tok.write_text(text + " " * max(0, size - len(text)))
    return dst


# ------------------------------------------------------------------------------------------ 1. output paths


def test_out_under_a_regular_file(tmp_path, good, capsys):
    (tmp_path / "afile").write_text("x")
    rc, err = cli(capsys, "merge", good, tmp_path / "afile" / "out", "-q")
    assert rc == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err and "fix:" in err
    assert (tmp_path / "afile").read_text() == "x" and leftovers(tmp_path) == []


def test_out_on_a_read_only_filesystem(tmp_path, good, tmpfs, capsys):
    ro = tmpfs("ro", "1m", ro=True)
    rc, err = cli(capsys, "merge", good, ro / "out", "-q")
    assert rc == 2 and str(ro) in err and "read-only" in err
    assert list(ro.iterdir()) == []


def test_out_in_a_folder_without_write_permission(tmp_path, good, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.geteuid() != 0:
            rc, err = cli(capsys, "merge", good, locked / "out", "-q")
        else:  # root writes anywhere: run the CLI as an unprivileged user, where that user can run it
            for p in (tmp_path, *tmp_path.parents):
                if not os.stat(p).st_mode & 0o001:
                    pytest.skip(f"{p} is not searchable by an unprivileged user")
            probe = subprocess.run([sys.executable, "-c", "import evomerge.cli"], user=65534, group=65534,
                                   env=ENV, capture_output=True, cwd=tmp_path, check=False)
            if probe.returncode != 0:
                pytest.skip("an unprivileged user cannot run this Python / import evomerge here")
            r = cli_proc("merge", good, locked / "out", "-q", cwd=tmp_path, user=65534, group=65534)
            rc, err = r.returncode, r.stderr
    except PermissionError:
        pytest.skip("an unprivileged user cannot run this Python here")
    finally:
        locked.chmod(0o755)
    assert rc == 2 and str(locked) in err and "permission" in err
    assert list(locked.iterdir()) == []


def test_disk_full_while_writing_shards(tmp_path, good, tmpfs, capsys):
    small = tmpfs("small", "256k")
    rc, err = cli(capsys, "merge", good, small / "out", "-q")
    assert rc == 2 and "no space left" in err and "model.safetensors" in err and str(small / "out") in err
    assert list(small.iterdir()) == []


def test_disk_full_while_copying_tokenizer(tmp_path, fam, tmpfs, capsys):
    """The shards fit (reserved with posix_fallocate), the tokenizer does not: one error naming the
    file, and nothing left on the small disk."""
    big = with_big_tokenizer(fam["expert1"], tmp_path / "bigtok", 2 * 2**20)
    r = recipe(tmp_path / "r.yaml", big, fam["expert2"])
    small = tmpfs("small", "1m")
    rc, err = cli(capsys, "merge", r, small / "out", "-q")
    assert rc == 2 and "tokenizer.json" in err and "No space left on device" in err and "free disk space" in err
    assert list(small.iterdir()) == []


def test_file_size_limit_while_copying_tokenizer(tmp_path, fam):
    """No mount needed: RLIMIT_FSIZE lets the (small) shards through and stops the 2 MB tokenizer."""
    big = with_big_tokenizer(fam["expert1"], tmp_path / "bigtok", 2 * 2**20)
    r = recipe(tmp_path / "r.yaml", big, fam["expert2"])
    limit = 2**20

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = cli_proc("merge", r, tmp_path / "out", "-q", "--shard-size", "200KB", cwd=tmp_path, preexec_fn=cap)
    assert p.returncode == 2, p.stderr
    assert "tokenizer.json" in p.stderr and "ulimit -f" in p.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "cpu:1", ""])
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_unknown_device_refused(tmp_path, fam, good, capsys, command, device):
    argv = (["merge", good, tmp_path / "out"] if command == "merge"
            else ["eval", fam["base"], "--suite", SUITE, "--limit", "2"])
    rc, err = cli(capsys, *argv, "--device", device)
    assert rc == 2 and "--device" in err and "cpu" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_cuda_device_without_a_gpu(tmp_path, fam, good, capsys, command):
    argv = (["merge", good, tmp_path / "out"] if command == "merge"
            else ["eval", fam["base"], "--suite", SUITE, "--limit", "2"])
    rc, err = cli(capsys, *argv, "--device", "cuda:3")
    assert rc == 2 and "--device" in err and "no CUDA GPU" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["lots", "0", "5 parsecs", "1.5.GB"])
def test_shard_size_junk(tmp_path, good, capsys, size):
    rc, err = cli(capsys, "merge", good, tmp_path / "out", "--shard-size", size)
    assert rc == 2 and "--shard-size" in err and "5GB" in err
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_model_folders_only(tmp_path, good, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    rc, err = cli(capsys, "merge", good, mine, "--overwrite", "-q")
    assert rc == 2 and str(mine) in err and "holds no model" in err
    assert (mine / "keep.txt").read_text() == "mine"
    rc, err = cli(capsys, "merge", good, tmp_path / "r.yaml", "--overwrite", "-q")
    assert rc == 2 and "is a file, not a model folder" in err and (tmp_path / "r.yaml").is_file()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    rc, err = cli(capsys, "merge", good, tmp_path / "dangling", "-q")
    assert rc == 2 and "broken symbolic link" in err
    assert leftovers(tmp_path) == []


def test_existing_out_speaks_cli_flags(tmp_path, good, capsys):
    assert cli(capsys, "merge", good, tmp_path / "out", "-q")[0] == 0
    rc, err = cli(capsys, "merge", good, tmp_path / "out", "-q")
    assert rc == 2 and "--overwrite" in err and "overwrite=True" not in err and str(tmp_path / "out") in err
    assert cli(capsys, "merge", good, tmp_path / "out", "-q", "--overwrite")[0] == 0
    assert leftovers(tmp_path) == []


def test_os_error_escaping_a_command_is_one_clear_line(tmp_path):
    """The safety net in main(): an OSError no specific check foresaw (here `zoo build` under a
    file) becomes `error: <command> failed on <path>: <reason> (fix: ...)`, exit 2."""
    (tmp_path / "afile").write_text("x")
    r = cli_proc("zoo", "build", "--out", "afile/zoo", "--data", "afile/data", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "error: `evomerge zoo build` failed on afile/" in r.stderr and "fix:" in r.stderr


_MEMORY = textwrap.dedent("""
    import resource, sys
    import evomerge.checkpoint, evomerge.cli, evomerge.materialize, evomerge.recipe
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2**20, resource.RLIM_INFINITY))
    sys.exit(evomerge.cli.main(sys.argv[1:]))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_error_is_a_clean_error(tmp_path):
    """A real MemoryError (a 3 GB recipe read under an address-space limit) is one clean line."""
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: no disk used
    r = subprocess.run([sys.executable, "-c", _MEMORY, "merge", str(huge), str(tmp_path / "out")], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in r.stderr
    assert r.returncode == 2 and "ran out of memory" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ 2. kill -9


_HOLDER = textwrap.dedent("""
    import sys, time, torch
    from evomerge.checkpoint import CheckpointWriter, TensorSpec
    w = CheckpointWriter(sys.argv[1], [TensorSpec("t", (256, 1024), torch.float32)], shard_size="1GB")
    w.write("t", torch.ones(256, 1024))
    print(w.tmp, flush=True)
    time.sleep(300)
""")


def _holder(out: Path) -> tuple[subprocess.Popen, Path]:
    """A real writer into ``out`` that stops half-way (its temporary folder holds a preallocated shard)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the writer process did not start"
    return proc, Path(line)


def test_killed_writers_temp_folder_removed_live_one_kept(tmp_path, good, capsys):
    out = tmp_path / "out"
    dead, dead_tmp = _holder(out)
    live, live_tmp = _holder(out)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert dead_tmp.is_dir() and (dead_tmp / "model.safetensors").stat().st_size >= 256 * 1024 * 4
        rc, err = cli(capsys, "merge", good, out, "-q")
        assert rc == 0
        assert not dead_tmp.exists() and f"removed {dead_tmp}" in err
        assert live_tmp.is_dir() and (live_tmp / "model.safetensors").is_file()  # a live writer is never touched
        assert (out / "config.json").is_file()
    finally:
        live.kill()
        live.wait()
    # once its owner is gone, the next merge to the same output removes it
    assert cli(capsys, "merge", good, out, "-q", "--overwrite")[0] == 0
    assert leftovers(tmp_path) == []


def test_kill9_of_cli_merge_then_merge_again(tmp_path, good):
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "merge", str(good), "out", "-q"], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not leftovers(tmp_path):
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    if (tmp_path / "out").exists():
        shutil.rmtree(tmp_path / "out")  # it finished before the kill
    r = cli_proc("merge", good, "out", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "config.json").is_file()


# ------------------------------------------------------------------------------------------ 3. damaged checkpoints


def _damage(src: Path, dst: Path, kind: str) -> str:
    """A copy of ``src`` damaged in one way; returns a word the error must contain."""
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    cfg = json.loads((dst / "config.json").read_text())
    if kind == "truncated":
        st.write_bytes(st.read_bytes()[:-1000])
        return "truncated"
    if kind == "header":
        data = bytearray(st.read_bytes())
        data[8:40] = b"\x00\xff" * 16
        st.write_bytes(bytes(data))
        return "header"
    if kind == "pickle":
        torch.save(load_file(str(st)), dst / "pytorch_model.bin")
        st.unlink()
        return "safe_serialization=True"
    t = load_file(str(st))
    word = ""
    if kind == "shape":
        name = "model.layers.1.mlp.up_proj.weight"
        t[name] = t[name][:-1].contiguous()
        word = name
    elif kind == "missing_layer":
        for k in [k for k in t if ".layers.1." in k]:
            del t[k]
        word = "layer(s) 1"
    elif kind == "missing_tensor":
        del t["model.layers.2.self_attn.k_proj.weight"]
        word = "model.layers.2.self_attn.k_proj.weight"
    elif kind == "missing_everywhere":
        for k in [k for k in t if k.endswith("mlp.gate_proj.weight")]:
            del t[k]
        word = "mlp.gate_proj.weight"
    elif kind == "no_head":
        del t["lm_head.weight"]
        word = "lm_head.weight"
    elif kind == "layers":
        cfg["num_hidden_layers"] += 2
        word = "num_hidden_layers = 5"
    elif kind == "vocab":
        cfg["vocab_size"] += 7
        word = "vocab_size"
    elif kind == "hidden":
        cfg["intermediate_size"] += 8
        word = "intermediate_size"
    elif kind == "config_value":
        cfg["num_hidden_layers"] = "three"
        word = "'three'"
    else:
        raise ValueError(kind)
    save_file(t, str(st), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return word


DAMAGE = ["truncated", "header", "pickle", "shape", "missing_layer", "missing_tensor", "missing_everywhere",
          "no_head", "layers", "vocab", "hidden", "config_value"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_eval_of_damaged_checkpoint(tmp_path, fam, capsys, kind):
    word = _damage(fam["expert1"], tmp_path / "m", kind)
    rc, err = cli(capsys, "eval", tmp_path / "m", "--suite", SUITE, "--limit", "2")
    assert rc == 2 and err.startswith("error: ") and str(tmp_path / "m") in err and word in err, err


@pytest.mark.parametrize("kind", DAMAGE)
def test_merge_of_damaged_source(tmp_path, fam, capsys, kind):
    """merge and eval refuse the same checkpoints, with the same message."""
    word = _damage(fam["expert1"], tmp_path / "m", kind)
    r = recipe(tmp_path / "r.yaml", tmp_path / "m", fam["expert2"])
    rc, err = cli(capsys, "merge", r, tmp_path / "out", "-q")
    assert rc == 2 and str(tmp_path / "m") in err and word in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    _, eval_err = cli(capsys, "eval", tmp_path / "m", "--suite", SUITE, "--limit", "2")
    assert eval_err == err


def test_eval_refuses_unexpected_tensors(tmp_path, fam, capsys):
    """A tensor the architecture has no place for (transformers would drop it silently)."""
    shutil.copytree(fam["expert1"], tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    t = load_file(str(st))
    t["model.extra_adapter.weight"] = torch.zeros(4, 4)
    save_file(t, str(st), metadata={"format": "pt"})
    rc, err = cli(capsys, "eval", tmp_path / "m", "--suite", SUITE, "--limit", "2")
    assert rc == 2 and "model.extra_adapter.weight" in err and "not part of the model" in err


def test_eval_refuses_a_tokenizer_larger_than_the_embedding(tmp_path, fam, capsys):
    shutil.copytree(REPO / "evals" / "zoo" / "expert_arith", tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fam["base"] / f, tmp_path / "m" / f)
    rc, err = cli(capsys, "eval", tmp_path / "m", "--suite", SUITE, "--limit", "2")
    assert rc == 2 and "the tokenizer has" in err and "rows" in err


# ------------------------------------------------------------------------------------------ 4. tokenizers


def _without_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).unlink()
    return dst


def test_merge_refuses_a_reference_model_without_tokenizer(tmp_path, fam, capsys):
    bare = _without_tokenizer(fam["expert1"], tmp_path / "bare")
    r = recipe(tmp_path / "r.yaml", bare, fam["expert2"])
    rc, err = cli(capsys, "merge", r, tmp_path / "out", "-q")
    assert rc == 2 and f"model {bare}" in err and "no tokenizer files" in err and "`tokenizer:" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # the recipe key fixes it, and eval then loads the result
    r = recipe(tmp_path / "r2.yaml", bare, fam["expert2"], tokenizer=str(fam["base"]))
    assert cli(capsys, "merge", r, tmp_path / "out", "-q")[0] == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    rc, out, err = cli_out(capsys, "eval", tmp_path / "out", "--suite", SUITE, "--limit", "2")
    assert rc == 0 and "combined" in out, err


def test_merge_refuses_a_tokenizer_key_without_tokenizer(tmp_path, fam, capsys):
    bare = _without_tokenizer(fam["base"], tmp_path / "bare")
    r = recipe(tmp_path / "r.yaml", fam["expert1"], fam["expert2"], tokenizer=str(bare))
    rc, err = cli(capsys, "merge", r, tmp_path / "out", "-q")
    assert rc == 2 and f"tokenizer source {bare}" in err and "no tokenizer files" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_tokenizer_key_may_name_a_tokenizer_only_folder(tmp_path, fam, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fam["base"] / f, tok / f)
    bare = _without_tokenizer(fam["expert1"], tmp_path / "bare")
    r = recipe(tmp_path / "r.yaml", bare, fam["expert2"], tokenizer=str(tok))
    assert cli(capsys, "merge", r, tmp_path / "out", "-q")[0] == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()


def test_eval_of_a_merge_without_tokenizer_says_how_to_fix(tmp_path, good, capsys):
    assert cli(capsys, "merge", good, tmp_path / "out", "-q")[0] == 0
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "out" / f).unlink()
    rc, err = cli(capsys, "eval", tmp_path / "out", "--suite", SUITE, "--limit", "2")
    assert rc == 2 and "has no tokenizer" in err and "`tokenizer:`" in err and str(tmp_path / "out") in err


# ------------------------------------------------------------------------------------------ 5. numbers


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--limit", "-3"), ("--limit", "many"),
                                        ("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "1.5")])
def test_eval_numbers_refused(fam, capsys, flag, value):
    rc, err = cli(capsys, "eval", fam["base"], "--suite", SUITE, f"{flag}={value}")
    assert rc == 2 and f"argument {flag}" in err and ">= 1" in err


def test_help_and_usage_errors_return_their_status(capsys):
    assert cli(capsys, "merge", "--help")[0] == 0
    rc, err = cli(capsys, "merge")
    assert rc == 2 and "required" in err


def test_overwrite_of_a_model_the_recipe_reads_is_refused(tmp_path, fam, capsys):
    src = tmp_path / "src"
    shutil.copytree(fam["expert1"], src)
    r = recipe(tmp_path / "r.yaml", src, fam["expert2"])
    before = (src / "model.safetensors").read_bytes()
    rc, err = cli(capsys, "merge", r, src, "--overwrite", "-q")
    assert rc == 2 and f"output folder {src} is (or holds) model {src}" in err
    assert (src / "model.safetensors").read_bytes() == before and leftovers(tmp_path) == []
