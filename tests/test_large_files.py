"""Checkpoints larger than this machine's memory: sparse files (apparent size above RAM + swap, real data
only in the tensors a command reads) are inspected and fingerprinted in bounded memory, and under an
address-space limit far below the file size, by a `modelkin` child process whose peak memory is measured.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkin.checkpoint import open_checkpoint
from modelkin.errors import CheckpointError
from tests.ckpt_factory import llamacpp_permute, write_safetensors_checkpoint

GB = 1 << 30
HIDDEN, HEADS, LAYERS, VOCAB = 256, 4, 4, 256
PEAK_RSS_BOUND = 1 * GB  # the bound on peak (anonymous) memory for inspect --select attention
# RLIMIT_AS for the child: what python + torch + modelkin's CLI reserve (measured on 2 cores: a peak
# address space of ~0.85 GB for inspect + fingerprint; torch alone imports under 0.75 GB, not under
# 0.5 GB, where OpenBLAS cannot allocate its buffers) plus room for the tensors read (< 1 MB here) and
# for more threads on larger machines. It is below the file's largest tensor (a 3.3 GB MLP matrix,
# never read) and far below the file's size, so a whole-file mapping fails under it (checked).
AS_LIMIT = 2 * GB


def _memory_total() -> int:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    swap = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("SwapTotal:"):
                swap = int(line.split()[1]) * 1024
    return ram + swap


# Above RAM + swap, so that a private (copy-on-write) mapping of the whole file is refused by the kernel.
APPARENT = max(40 * 10**9, _memory_total() + 8 * GB)
# Each layer's three MLP matrices are holes; their size makes up the apparent size.
INTER = APPARENT // (LAYERS * 3 * HIDDEN * 2) + 1

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; sparse files")


def _config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _layout(seed: int = 0) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """Every tensor's HF name -> shape in file order, and the data of the real (non-hole) ones."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        for proj in "qkvo":
            shapes[p + f"self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    real = {n: (torch.randn(*s, generator=g) * (0.02 * (1 + i % 7))).to(torch.bfloat16)
            for i, (n, s) in enumerate(shapes.items()) if ".mlp." not in n}
    return shapes, real


def _sparse_enough(path: Path) -> None:
    if path.stat().st_blocks * 512 > 1 * GB:
        pytest.skip(f"{path.parent} does not keep files sparse")


def write_sparse_safetensors(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """model.safetensors of APPARENT bytes (bf16): header and the real tensors written, MLP holes left."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_config()))
    shapes, real = _layout(seed)
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    path = directory / "model.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, tensor in real.items():
            f.seek(start + header[name]["data_offsets"][0])
            f.write(tensor.view(torch.uint16).numpy().tobytes())
        f.truncate(start + offset)
    _sparse_enough(path)
    return real


def write_sparse_gguf(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A llama GGUF of APPARENT bytes: metadata, tensor infos and the real (F32) tensors; MLP holes (F16).

    The real tensors' offsets are found with the gguf package's own reader (its read-only map of the
    whole file works above RAM), independently of modelkin's reader.
    """
    import gguf

    shapes, real = _layout(seed)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(LAYERS):
        for hf, g in block.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    writer = gguf.GGUFWriter(str(path), "llama")
    cfg = _config()
    for key, value in (("block_count", LAYERS), ("context_length", 128), ("embedding_length", HIDDEN),
                       ("feed_forward_length", INTER), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", HEADS), ("vocab_size", VOCAB)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", cfg["rope_theta"])
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    data: dict[str, np.ndarray] = {}
    for hf, shape in shapes.items():
        if hf in real:
            array = real[hf].float().numpy()
            if ".q_proj." in hf or ".k_proj." in hf:
                array = llamacpp_permute(array, HEADS)
            data[names[hf]] = np.ascontiguousarray(array)
            writer.add_tensor_info(names[hf], shape, np.dtype(np.float32), array.nbytes)
        else:
            writer.add_tensor_info(names[hf], shape, np.dtype(np.float16), 2 * int(np.prod(shape)),
                                   raw_dtype=gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    total = sum(-(-2 * int(np.prod(s)) // align) * align if hf not in real else
                -(-real[hf].numel() * 4 // align) * align for hf, s in shapes.items())
    with path.open("r+b") as f:  # the data section starts at the next aligned offset after the infos
        f.truncate(-(-f.seek(0, 2) // align) * align + total)
    reader = gguf.GGUFReader(str(path), "r")
    with path.open("r+b") as f:
        for t in reader.tensors:
            if t.name in data:
                f.seek(t.data_offset)
                f.write(data[t.name].tobytes())
    del reader
    _sparse_enough(path)
    return real


# Runs `modelkin` commands (separated by "::") in one process, then reports its peak memory and,
# with PROBE set, whether a read-only mapping of that whole file could be made in it.
RUNNER = r"""
import mmap, os, sys
from modelkin.cli import main
args, code = sys.argv[1:], 0
while args and not code:
    cut = args.index("::") if "::" in args else len(args)
    code, args = main(args[:cut]), args[cut + 1:]
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print("MEMORY", *(int(status[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon", "VmPeak")), file=sys.stderr)
if os.environ.get("PROBE"):
    with open(os.environ["PROBE"], "rb") as f:
        try:
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ).close()
            print("PROBE mapped", file=sys.stderr)
        except OSError as err:
            print("PROBE refused", err, file=sys.stderr)
sys.exit(code)
"""


def run_measured(*commands: list[str], as_limit: int | None = None, probe: Path | None = None) -> dict:
    """`modelkin` commands in one child (optionally under RLIMIT_AS); exit code, output, memory."""

    def limit() -> None:
        if as_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    args = [str(a) for cmd in commands for a in [*cmd, "::"]][:-1]
    env = {**os.environ, "PROBE": str(probe or "")}
    out = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True,
                         timeout=300, preexec_fn=limit, env=env)
    line = next((x for x in out.stderr.splitlines() if x.startswith("MEMORY ")), None)
    hwm, anon, vmpeak = (int(v) for v in line.split()[1:]) if line else (-1, -1, -1)
    print(f"{' + '.join(c[0] for c in commands)} on {commands[0][1]}: rc {out.returncode}, peak RSS (VmHWM) "
          f"{hwm / 1e6:.0f} MB, RssAnon at exit {anon / 1e6:.0f} MB, peak address space "
          f"{vmpeak / 1e6:.0f} MB, RLIMIT_AS {f'{as_limit / 1e6:.0f} MB' if as_limit else 'none'}")
    return {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr, "peak_rss": hwm,
            "rss_anon_end": anon, "vm_peak": vmpeak,
            "probe": next((x for x in out.stderr.splitlines() if x.startswith("PROBE ")), "")}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("large")
    st_real = write_sparse_safetensors(root / "st")
    gguf_real = write_sparse_gguf(root / "model.gguf")
    return {"safetensors": (root / "st", st_real), "gguf": (root / "model.gguf", gguf_real)}


def _data_file(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def _expected(real: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    return {n: t.float() if fmt == "gguf" else t for n, t in real.items()}


def test_a_private_map_of_the_whole_file_is_refused(sparse):
    """The premise: safetensors' safe_open maps the file copy-on-write, which the kernel refuses here."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("overcommit_memory=1 grants any private mapping")
    from safetensors import safe_open

    with pytest.raises(Exception, match="Cannot allocate memory"):
        safe_open(str(_data_file(sparse["safetensors"][0])), framework="pt")


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_tensors_and_slices_of_a_file_larger_than_memory(sparse, fmt):
    path, real = sparse[fmt]
    assert _data_file(path).stat().st_size >= APPARENT * 0.99
    with open_checkpoint(path) as ckpt:
        assert len(ckpt) == len(_layout()[0])
        for name, want in _expected(real, fmt).items():
            assert torch.equal(ckpt.get_tensor(name), want), name
        q = "model.layers.2.self_attn.q_proj.weight"
        want = _expected(real, fmt)[q]
        assert torch.equal(ckpt.get_slice(q, 0, 64, 128), want[64:128])
        assert torch.equal(ckpt.get_slice(q, 1, 8, 40), want[:, 8:40])
        if fmt == "safetensors":  # a slice of a hole tensor reads only its rows
            before = ckpt.bytes_read
            rows = ckpt.get_slice("model.layers.3.mlp.up_proj.weight", 0, INTER - 2, INTER)
            assert rows.shape == (2, HIDDEN) and not rows.any()
            assert ckpt.bytes_read - before == 2 * HIDDEN * 2


def _check_commands(path: Path, real: dict[str, torch.Tensor], fmt: str, tmp_path: Path,
                    as_limit: int | None) -> dict:
    out_json = tmp_path / "inspect.json"
    res = run_measured(["inspect", path, "--select", "attention", "--no-cache", "--no-table", "--device", "cpu",
                        "--json", out_json],
                       ["fingerprint", path, path, "--methods", "std_curve", "--device", "cpu",
                        "--json", tmp_path / "fp.json"],
                       as_limit=as_limit, probe=_data_file(path) if as_limit else None)
    assert res["rc"] == 0, res["stderr"][-2000:]
    stats = {t["name"]: t for t in json.loads(out_json.read_text())["tensors"]}
    want = _expected(real, fmt)
    assert set(stats) == {n for n in want if ".self_attn." in n}
    for name, entry in stats.items():
        assert entry["std_population"] == pytest.approx(want[name].double().std(unbiased=False).item(), rel=1e-6)
    fp = json.loads((tmp_path / "fp.json").read_text())
    assert fp["methods"]["std_curve"]["score"] == pytest.approx(1.0)
    return res


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_inspect_attention_and_fingerprint_in_bounded_memory_under_an_address_space_limit(sparse, fmt, tmp_path):
    """One child does both commands under RLIMIT_AS (a whole-file map is refused in it: checked), and its
    peak RSS (VmHWM, an upper bound of its peak anonymous memory: no file is mapped) stays bounded."""
    path, real = sparse[fmt]
    res = _check_commands(path, real, fmt, tmp_path, AS_LIMIT)
    assert res["probe"].startswith("PROBE refused"), res["probe"]
    assert 0 < res["vm_peak"] <= AS_LIMIT
    assert 0 < res["peak_rss"] < PEAK_RSS_BOUND, res["peak_rss"]


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_a_truncated_file_larger_than_memory_fails_in_one_line(sparse, fmt, tmp_path):
    path, _ = sparse[fmt]
    src = _data_file(path)
    cut = tmp_path / src.name
    with src.open("rb") as f, cut.open("wb") as g:  # the header and the first real tensors, then a hole
        g.write(f.read(1 << 20))
        g.truncate(src.stat().st_size - (1 << 30))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(cut)
    message = str(err.value)
    assert "truncated" in message and "\n" not in message, message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100_000  # kB: nothing of its size


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(6, 10, 4, generator=g).to(torch.bfloat16),
               "b": torch.randn(5, 3, generator=g), "i": torch.arange(12, dtype=torch.int64).reshape(3, 4),
               "m": torch.rand(7, generator=g) > 0.5, "e": torch.zeros(0, 4)}
    directory = write_safetensors_checkpoint(tmp_path_factory.mktemp("small"), tensors, None)
    return directory, tensors


@pytest.mark.parametrize("mode", ["mmap", "pread", "safe_open"])
def test_safetensors_read_modes_agree(small_dir, mode, monkeypatch):
    monkeypatch.setenv("MODELKIN_SAFETENSORS_READ", mode)
    directory, tensors = small_dir
    with open_checkpoint(directory) as ckpt:
        for name, want in tensors.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want)
        a = tensors["a"]
        for dim in range(3):
            part = ckpt.get_slice("a", dim, 1, 3)
            assert torch.equal(part, a.narrow(dim, 1, 2))
            assert part.is_contiguous() or mode == "safe_open"  # safe_open's slices may be views
        assert torch.equal(ckpt.get_slice("b", 1, 0, 3), tensors["b"])
        got = ckpt.get_tensor("b")
        got.zero_()  # callers may modify what they get (a mapped tensor is copy-on-write)
        if mode != "safe_open":  # safe_open returns views of one map: later reads would see the zeros
            assert torch.equal(ckpt.get_tensor("b"), tensors["b"])
    assert torch.equal(open_checkpoint(directory).get_tensor("b"), tensors["b"])  # the file is unchanged


def test_safe_open_mode_falls_back_to_mapping_ranges(small_dir, monkeypatch):
    import modelkin.checkpoint.safetensors_reader as reader

    def refuse(*args, **kwargs):
        raise OSError("unable to mmap: Cannot allocate memory (12)")

    monkeypatch.setattr(reader, "safe_open", refuse)
    directory, tensors = small_dir
    with reader.SafetensorsSource(directory, [directory / "model.safetensors"], read_mode="safe_open") as ckpt:
        assert torch.equal(ckpt.get_tensor("b"), tensors["b"])
        assert torch.equal(ckpt.get_slice("a", 1, 2, 5), tensors["a"][:, 2:5])


def test_torch_state_dict_is_read_by_record_without_mapping_the_file(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 6, generator=g)
    state = {"w": w, "rows": w[2:5], "t": w.t(), "h": torch.randn(4, generator=g).half(), "z": torch.zeros(0)}
    torch.save(state, tmp_path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("the file was mapped")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", refuse)
    with open_checkpoint(tmp_path / "pytorch_model.bin") as ckpt:
        for name, want in state.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want) and got.is_contiguous(), name
        assert ckpt.bytes_read == sum(t.numel() * t.element_size() for t in state.values())
    raw = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: raw.index(b"data/1")])  # ends inside the records
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "cut.bin")
    assert "\n" not in str(err.value)
