"""Batch fill-mask == transformers.pipeline("fill-mask") on tiny real models (saved / from_pretrained)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    pipeline,
)

from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.core.stage import ResumeError
from distilflow.tasks.infer.batch_io import open_output, run_file
from distilflow.tasks.infer.fill_mask import FillMaskConfig, FillMasker, normalize_masks
from tests.conftest import GUTENBERG

MAX_POS = 128


def save_tiny_mlm(path: Path, kind: str, tokenizer_path: Path, seed: int = 0) -> str:
    """A tiny MLM with the shared bert-base-uncased tokenizer, saved and loaded via from_pretrained.

    ``initializer_range`` is large so the random model has well separated logits (no near-ties in the
    top-k that float noise between batchings could reorder).
    """
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64,
                                           max_position_embeddings=MAX_POS, initializer_range=0.5))
    else:
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=MAX_POS,
                                                       initializer_range=0.5))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def model_path(request, tmp_path_factory, bert_tokenizer_path) -> str:
    return save_tiny_mlm(tmp_path_factory.mktemp(request.param), request.param, bert_tokenizer_path)


@pytest.fixture(scope="module")
def fill(model_path):
    return pipeline("fill-mask", model=model_path, tokenizer=model_path, device="cpu")


def gutenberg_texts(n: int, seed: int = 0) -> list[str]:
    """Real sentences with 1-3 words replaced by [MASK] / [mask] (deterministic)."""
    rng = random.Random(seed)
    lines = [ln.strip() for ln in (GUTENBERG / "pg1342.txt").read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if 6 <= len(ln.split()) <= 25]
    out = []
    for ln in rng.sample(lines, n):
        words = ln.split()
        for j in sorted(rng.sample(range(len(words)), rng.choice([1, 1, 2, 3]))):
            words[j] = rng.choice(["[MASK]", "[mask]"])
        out.append(" ".join(words))
    return out


def assert_same(ours, ref, tol: float = 1e-4) -> None:
    """Same tokens, token strings and sequences in the same order; scores within ``tol``."""
    if ref and isinstance(ref[0], list):  # several masks
        assert isinstance(ours[0], list) and len(ours) == len(ref)
        for o, r in zip(ours, ref, strict=True):
            assert_same(o, r, tol)
        return
    assert [p["token"] for p in ours] == [p["token"] for p in ref]
    assert [p["token_str"] for p in ours] == [p["token_str"] for p in ref]
    assert [p["sequence"] for p in ours] == [p["sequence"] for p in ref]
    for o, r in zip(ours, ref, strict=True):
        assert abs(o["score"] - r["score"]) < tol


def _ref(fill, text, mask_token, **kw):
    out = fill(normalize_masks(text, mask_token), **kw)
    return out


def test_matches_pipeline_every_row(model_path, fill):
    texts = gutenberg_texts(40)
    assert any("[mask]" in t for t in texts) and any(t.count("MASK") + t.count("mask") > 1 for t in texts)
    fm = FillMasker(FillMaskConfig(model=model_path, batch_size=8, top_k=5))
    ours = fm(texts)
    ref = fill([normalize_masks(t, "[MASK]") for t in texts], batch_size=8)
    for o, r in zip(ours, ref, strict=True):
        assert_same(o, r)


def test_batches_in_parallel_streams_give_the_same_answers(model_path, fill):
    """Two batches at a time, one thread each (tasks/infer/streams.py): the pipeline's answers, in row order,
    and torch's thread count is restored afterwards."""
    texts = gutenberg_texts(40, seed=3)
    original = torch.get_num_threads()
    fm = FillMasker(FillMaskConfig(model=model_path, batch_size=4, threads=2))
    assert fm.streams == 2
    before = torch.get_num_threads()
    ours = fm(texts)
    assert torch.get_num_threads() == before
    one = FillMasker(FillMaskConfig(model=model_path, batch_size=4, threads=1))(texts)
    torch.set_num_threads(original)
    ref = fill([normalize_masks(t, "[MASK]") for t in texts], batch_size=8)
    for o, s, r in zip(ours, one, ref, strict=True):
        assert_same(o, r)
        assert_same(o, s)


def test_lowercase_mask_needs_normalising(model_path, fill):
    fm = FillMasker(FillMaskConfig(model=model_path))
    # the uncased tokenizer splits "[mask]" into "[", "mask", "]" -- the pipeline finds no mask there
    with pytest.raises(Exception, match="No mask_token"):
        fill("Paris is the [mask] of France.")
    assert_same(fm(["Paris is the [mask] of France."])[0], fill("Paris is the [MASK] of France."))


@pytest.mark.parametrize("top_k", [1, 3, 12])
def test_targets_as_pipeline(model_path, fill, top_k):
    targets = ["paris", "london", "the", "capital", "Xyzzyplugh", "the"]  # unknown word -> first piece; dupes
    fm = FillMasker(FillMaskConfig(model=model_path, targets=tuple(targets), top_k=top_k))
    texts = ["Paris is the [MASK] of France.", "The [mask] and the [MASK] of it."]
    for text, ours in zip(texts, fm(texts), strict=True):
        ref = _ref(fill, text, "[MASK]", targets=targets, top_k=top_k)
        assert_same(ours, ref)
    assert len(fm(texts)[0]) == min(top_k, 5)  # 5 distinct target ids


def test_top_k_and_multi_mask_shape(model_path):
    fm = FillMasker(FillMaskConfig(model=model_path, top_k=7))
    one, three = fm(["a [MASK] b", "[MASK] [MASK] and [mask]"])
    assert len(one) == 7 and isinstance(one[0], dict)
    assert len(three) == 3 and all(len(x) == 7 for x in three)
    assert "[MASK]" in three[0][0]["sequence"]  # the other masks stay visible, as in the pipeline


def test_long_texts_truncate_around_mask(model_path, fill):
    words = " ".join(f"word{i}" for i in range(300)).split()
    early = " ".join(words[:5] + ["[MASK]"] + words[5:])
    late = " ".join(words[:290] + ["[mask]"] + words[290:])
    fm = FillMasker(FillMaskConfig(model=model_path))
    assert fm.max_length == MAX_POS
    o_early, o_late = fm([early, late])
    # mask inside the first window: identical to the pipeline's truncation to the model's length
    assert_same(o_early, fill(early, tokenizer_kwargs={"truncation": True, "max_length": MAX_POS}))
    # mask near the end: the window around the mask, decoded, is what the model saw
    tok = fm.tokenizer
    ids = tok(normalize_masks(late, tok.mask_token))["input_ids"]
    window = fm._window(ids, [i for i, t in enumerate(ids) if t == tok.mask_token_id])
    assert MAX_POS - 6 <= len(window) <= MAX_POS and tok.mask_token_id in window  # cut at word boundaries
    window_text = tok.decode(window, skip_special_tokens=False).replace("[CLS] ", "").replace(" [SEP]", "")
    assert_same(o_late, fill(window_text))


def test_bad_rows_policy(model_path):
    long = " ".join(["x"] * 400) + " [MASK]"
    far = "[MASK] " + " ".join(["y"] * 300) + " [MASK]"
    fm = FillMasker(FillMaskConfig(model=model_path, too_long="error"))
    out = fm(["no mask here", long, "fine [MASK]."])
    assert out[0]["error"] == "no_mask" and out[1]["error"] == "too_long" and isinstance(out[2], list)
    fm2 = FillMasker(FillMaskConfig(model=model_path, too_long="truncate"))
    out2 = fm2([long, far])
    assert isinstance(out2[0], list) and out2[1]["error"] == "masks_too_far_apart"


def test_config_errors_name_the_field(model_path):
    with pytest.raises(ConfigError, match="top_k"):
        FillMaskConfig(model=model_path, top_k=0)
    with pytest.raises(ConfigError, match="too_long"):
        FillMaskConfig(model=model_path, too_long="drop")  # type: ignore[arg-type]


def test_file_to_parquet_errors_manifest_and_resume(model_path, fill, tmp_path):
    texts = gutenberg_texts(25, seed=3)
    lines = texts[:10] + ["no mask in this line", ""] + texts[10:]
    src = tmp_path / "in" / "day-01.txt"
    src.parent.mkdir()
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = FillMaskConfig(model=model_path, batch_size=4, window_rows=8, top_k=3)
    out = str(tmp_path / "out")
    stage = open_output(out, "fill-mask", cfg.to_dict(), cfg.output_fingerprint())
    marker = run_file(FillMasker(cfg), stage, str(src), "day-01")
    assert marker["input_rows"] == len(lines) and marker["ok_rows"] == len(texts) and marker["error_rows"] == 2
    assert marker["skipped"] == {"empty_text": 1, "no_mask": 1}
    table = pq.read_table(tmp_path / "out" / "day-01.parquet")
    assert [f.name for f in table.schema][:7] == ["row_id", "mask_index", "rank", "token", "token_str", "score",
                                                  "sequence"]
    assert str(table.schema.field("row_id").type) == "int64" and str(table.schema.field("score").type) == "float"
    rows = table.to_pylist()
    assert [r["row_id"] for r in rows] == sorted(r["row_id"] for r in rows)  # input order
    errs = [json.loads(x) for x in (tmp_path / "out" / ".distilflow" / "errors" / "day-01.jsonl").read_text().splitlines()]
    assert [(e["row_id"], e["reason"]) for e in errs] == [(10, "no_mask"), (11, "empty_text")]
    assert "fix:" in errs[0]["message"] and "day-01.txt:11" in errs[0]["message"]
    # every row: compare with the pipeline on the same line
    for rid, text in enumerate(lines):
        got = [r for r in rows if r["row_id"] == rid]
        if rid in (10, 11):
            assert not got
            continue
        ref = _ref(fill, text, "[MASK]", top_k=3)
        ref = ref if isinstance(ref[0], list) else [ref]
        assert len(got) == 3 * len(ref)
        for r in got:
            p = ref[r["mask_index"]][r["rank"] - 1]
            assert (r["token"], r["token_str"], r["sequence"]) == (p["token"], p["token_str"], p["sequence"])
            assert abs(r["score"] - p["score"]) < 1e-4
    # resume: a rerun skips the finished file and leaves it untouched
    before = (tmp_path / "out" / "day-01.parquet").stat().st_mtime_ns
    again = run_file(FillMasker(cfg), stage, str(src), "day-01")
    assert again.get("skipped_done") and (tmp_path / "out" / "day-01.parquet").stat().st_mtime_ns == before
    # another config in the same folder is refused, naming the differing field
    other = cfg.replace(top_k=4)
    with pytest.raises(ResumeError, match="top_k"):
        open_output(out, "fill-mask", other.to_dict(), other.output_fingerprint())


def test_json_format_is_pipeline_output(model_path, fill, tmp_path):
    src = tmp_path / "req.json"
    texts = ["Paris is the [mask] of France.", "no mask", "The [MASK] and [MASK]."]
    src.write_text(json.dumps({"inputs": {"input_string": texts}}))
    cfg = FillMaskConfig(model=model_path, format="json")
    stage = open_output(str(tmp_path / "o"), "fill-mask", cfg.to_dict(), cfg.output_fingerprint())
    run_file(FillMasker(cfg), stage, str(src), "req", fmt="json")
    got = json.loads((tmp_path / "o" / "req.json").read_text())
    assert len(got) == 3 and got[1] is None
    assert_same(got[0], _ref(fill, texts[0], "[MASK]"))
    assert_same(got[2], _ref(fill, texts[2], "[MASK]"))


def test_fast_mode_runs_int8_on_onnx_runtime_and_reports_agreement(model_path, tmp_path, monkeypatch):
    """--fast: the trunk exported once to an int8 ONNX file (cached), its MatMuls quantized, answers close to
    the exact mode's, agreement measured and reported; a second job on the same model reuses the export."""
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "x.txt"
    src.write_text("\n".join(gutenberg_texts(20, seed=5)) + "\n")
    cfg = FillMaskConfig(model=model_path, quantize="int8", device="cpu")
    stage = open_output(str(tmp_path / "o"), "fill-mask", cfg.to_dict(), cfg.output_fingerprint())
    fm = FillMasker(cfg)
    exported = list((tmp_path / "cache" / "fast").glob("*/trunk.int8.onnx"))
    assert len(exported) == 1
    import onnx

    ops = {n.op_type for n in onnx.load(str(exported[0])).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    marker = run_file(fm, stage, str(src), "x")
    c = marker["counts"]
    assert c["fast_check_masks"] == c["masks"] > 0
    assert 0.5 <= c["fast_top1_agree"] / c["fast_check_masks"] <= 1.0
    mtime = exported[0].stat().st_mtime_ns
    FillMasker(cfg)
    assert exported[0].stat().st_mtime_ns == mtime  # cached, not exported again


def test_fast_mode_bf16_runs_the_trunk_in_bf16_and_reports_agreement(model_path, tmp_path):
    """--fast on a CPU with native bf16: the layers before the last under bf16 autocast (their matrix
    products in bf16), the last layer and head in float32; answers close to the exact mode's, agreement
    measured and reported."""
    src = tmp_path / "x.txt"
    texts = gutenberg_texts(20, seed=5)
    src.write_text("\n".join(texts) + "\n")
    cfg = FillMaskConfig(model=model_path, quantize="bf16", device="cpu")
    fm = FillMasker(cfg)
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o.dtype))
             for m in fm.model.modules() if isinstance(m, torch.nn.Linear)]
    fast = fm(texts)
    for h in hooks:
        h.remove()
    assert torch.bfloat16 in seen and torch.float32 in seen  # trunk in bf16, last layer and head in fp32
    exact = FillMasker(FillMaskConfig(model=model_path, device="cpu"))(texts)
    top1 = [(o[0] if isinstance(o[0], dict) else o[0][0])["token"] for o in fast]
    top1_ref = [(o[0] if isinstance(o[0], dict) else o[0][0])["token"] for o in exact]
    assert sum(a == b for a, b in zip(top1, top1_ref, strict=True)) >= 0.8 * len(texts)
    stage = open_output(str(tmp_path / "o"), "fill-mask", cfg.to_dict(), cfg.output_fingerprint())
    c = run_file(FillMasker(cfg), stage, str(src), "x")["counts"]  # a new job: its first window is checked
    assert c["fast_check_masks"] == c["masks"] > 0 and c["fast_top1_agree"] <= c["fast_check_masks"]
    # --fast-check-rows 0: no exact pass, no agreement counters, the same answers; 3: only three rows checked
    unchecked = FillMaskConfig(model=model_path, quantize="bf16", device="cpu", fast_check_rows=0)
    assert unchecked.output_fingerprint() == cfg.output_fingerprint()  # the answers do not depend on it
    c0 = run_file(FillMasker(unchecked), open_output(str(tmp_path / "o0"), "fill-mask", unchecked.to_dict(),
                                                     unchecked.output_fingerprint()), str(src), "x")["counts"]
    assert "fast_check_masks" not in c0 and c0["masks"] == c["masks"]
    three = FillMaskConfig(model=model_path, quantize="bf16", device="cpu", fast_check_rows=3)
    c3 = run_file(FillMasker(three), open_output(str(tmp_path / "o3"), "fill-mask", three.to_dict(),
                                                 three.output_fingerprint()), str(src), "x")["counts"]
    assert 3 <= c3["fast_check_masks"] < c["fast_check_masks"]


def test_fast_flag_resolves_to_the_machines_mode(monkeypatch):
    """--fast (quantize "auto") is resolved when the config is made, so config.json and the fingerprint
    name the mode that ran; DISTILFLOW_FAST_MODE overrides the CPU-flag choice."""
    from distilflow.tasks.infer import config as infer_config

    for mode in ("bf16", "int8"):
        monkeypatch.setenv("DISTILFLOW_FAST_MODE", mode)
        infer_config.fast_mode.cache_clear()
        cfg = FillMaskConfig(model="m", quantize="auto")
        assert cfg.quantize == mode and cfg.to_dict()["quantize"] == mode
        assert cfg.output_fingerprint() == FillMaskConfig(model="m", quantize=mode).output_fingerprint()
    monkeypatch.delenv("DISTILFLOW_FAST_MODE")
    infer_config.fast_mode.cache_clear()
    flags = Path("/proc/cpuinfo").read_text()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert infer_config.fast_mode() == ("bf16" if native else "int8")


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_top1(model_path):
    cpu = FillMasker(FillMaskConfig(model=model_path, device="cpu"))
    texts = gutenberg_texts(30, seed=7)
    ref = cpu(texts)
    from distilflow.tasks.infer.fill_mask import load_mlm

    load_mlm.cache_clear()
    gpu = FillMasker(FillMaskConfig(model=model_path, device="cuda"))
    assert gpu.dtype == torch.bfloat16
    out = gpu(texts)
    top1 = [(o[0] if isinstance(o[0], dict) else o[0][0])["token"] for o in out]
    top1_ref = [(o[0] if isinstance(o[0], dict) else o[0][0])["token"] for o in ref]
    assert sum(a == b for a, b in zip(top1, top1_ref, strict=True)) >= 0.9 * len(texts)


def test_cli_flow_folder_of_files_and_resume(model_path, tmp_path, prefect_test_harness_session):
    from distilflow.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    texts = gutenberg_texts(6, seed=9)
    (inp / "a.txt").write_text("\n".join(texts) + "\n")
    (inp / "b.json").write_text(json.dumps({"input_data": ["Paris is the [mask] of France.", "no mask"]}))
    out = tmp_path / "out"
    args = ["fill-mask", "--input", str(inp), "--output", str(out), "--model", model_path, "--top-k", "2",
            "--threads", "1"]
    assert main(args) == 0
    manifest = json.loads((out / ".distilflow" / "manifest.json").read_text())
    assert manifest["counts"] == {"error_rows": 1, "input_rows": 8, "masks": manifest["counts"]["masks"],
                                  "ok_rows": 7}
    assert sorted(f["file"] for f in manifest["files"]) == ["a.parquet", "b.parquet"]
    assert pq.read_table(out / "b.parquet").num_rows == 2 and (out / ".distilflow" / "config.json").exists()
    before = (out / "a.parquet").stat().st_mtime_ns
    assert main(args) == 0  # resume: nothing recomputed
    assert (out / "a.parquet").stat().st_mtime_ns == before
