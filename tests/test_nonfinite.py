"""Non-finite weights (issue 15): a NaN or inf stored in any format, or produced by the cast to the load dtype, is
refused at load time with one line naming the file and the tensor; eval never reports a non-finite loss as a
success. Real files in tmp_path, the CLI run in-process (and once as a subprocess) as a user would."""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import child_env
from mamba2 import Mamba2Config, Mamba2LM
from mamba2.cli import main
from mamba2.errors import UserError
from mamba2.interop import load, save_pretrained
from mamba2.interop.formats import SAFETENSORS
from mamba2.tokenizer import ByteTokenizer

TINY = dict(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, chunk_size=8)
REPO = Path(__file__).resolve().parents[1]
POISONED = "backbone.layers.1.mixer.D"


def model(**kw) -> Mamba2LM:
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(**{**TINY, **kw})).eval()


def save(m: Mamba2LM, d: Path, fmt: str, weights: str | None = None) -> Path:
    return save_pretrained(m, d, format=fmt, tokenizer=ByteTokenizer(), weights=weights)


def with_nan(d: Path, fmt: str, weights: str | None = None) -> Path:
    """A model directory whose tensor ``POISONED`` holds one NaN, written by the regular writer of ``fmt``."""
    m = model()
    with torch.no_grad():
        m.get_parameter(POISONED)[3] = float("nan")
    return save(m, d, fmt, weights)


def with_inf_bytes(d: Path, name: str = "backbone.layers.0.mixer.in_proj.weight") -> Path:
    """A model directory whose ``model.safetensors`` had 4 bytes of tensor ``name`` overwritten by a float32 inf."""
    save(model(), d, "mamba2")
    f = d / SAFETENSORS
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start = 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0] + 4 * 5
    raw[start:start + 4] = struct.pack("<f", float("inf"))
    f.write_bytes(bytes(raw))
    return d


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


CASES = {
    "mamba2": lambda d: (with_nan(d, "mamba2"), SAFETENSORS, POISONED, "1 NaN and 0 infinite"),
    "official-bin": lambda d: (with_nan(d, "official"), "pytorch_model.bin", POISONED, "1 NaN and 0 infinite"),
    "official-safetensors": lambda d: (with_nan(d, "official", "safetensors"), SAFETENSORS, POISONED,
                                       "1 NaN and 0 infinite"),
    "hf": lambda d: (with_nan(d, "hf"), SAFETENSORS, POISONED, "1 NaN and 0 infinite"),
    "inf-bytes": lambda d: (with_inf_bytes(d), SAFETENSORS, "backbone.layers.0.mixer.in_proj.weight",
                            "0 NaN and 1 infinite"),
}


@pytest.mark.parametrize("case", CASES)
def test_load_refuses_non_finite_weights_naming_file_and_tensor(tmp_path, case):
    d, file, tensor, counts = CASES[case](tmp_path / "m")
    with pytest.raises(UserError) as e:
        load(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / file}: tensor '{tensor}' holds {counts} value(s)"), msg
    assert "corrupt" in msg and "\n" not in msg


@pytest.mark.parametrize("case", ["mamba2", "official-safetensors", "hf", "inf-bytes"])
def test_eval_and_generate_exit_2_with_one_line_naming_the_tensor(tmp_path, capsys, case):
    d, _, tensor, _ = CASES[case](tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    argv = {"eval": ["eval", "--checkpoint", str(d), "--corpus", str(tmp_path / "corpus.txt"), "--split", "all",
                     "--seq-len", "32", "--device", "cpu"],
            "generate": ["generate", "--checkpoint", str(d), "--prompt", "ab", "--max-new-tokens", "4",
                         "--temperature", "0", "--device", "cpu"]}
    for cmd, args in argv.items():
        assert main(args) == 2, cmd
        assert f"tensor '{tensor}' holds" in one_line_error(capsys), cmd


def test_generate_as_a_subprocess_fails_cleanly(tmp_path):
    d = with_inf_bytes(tmp_path / "m")
    env = child_env(HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "mamba2", "generate", "--checkpoint", str(d), "--temperature", "0",
                           "--max-new-tokens", "4", "--device", "cpu"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "in_proj.weight' holds 0 NaN and 1 infinite" in lines[0], proc.stderr


def test_overflow_in_the_cast_to_the_load_dtype_is_named_as_such(tmp_path):
    m = model()
    with torch.no_grad():
        m.get_parameter(POISONED)[0] = 1e6          # finite in float32, inf in float16
    d = save(m, tmp_path / "m", "mamba2")
    assert torch.isfinite(load(d).model.get_parameter(POISONED)).all()
    with pytest.raises(UserError, match=rf"tensor '{POISONED}' holds 0 NaN and 1 infinite value\(s\) of \d+ after "
                                        r"the cast from torch.float32 to torch.float16: load it in a wider dtype"):
        load(d, dtype=torch.float16)


def test_eval_refuses_a_non_finite_loss_from_finite_weights(tmp_path, capsys):
    m = model(tie_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight.mul_(1e37)                 # finite, but the logits overflow
    d = save(m, tmp_path / "m", "mamba2")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    assert main(["eval", "--checkpoint", str(d), "--corpus", str(tmp_path / "corpus.txt"), "--split", "all",
                 "--seq-len", "32", "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert "loss" not in out.out and out.err.startswith("error: ") and len(out.err.strip().splitlines()) == 1
    assert re.search(r"\(all\): the loss is (nan|inf): the model computes non-finite logits", out.err), out.err
