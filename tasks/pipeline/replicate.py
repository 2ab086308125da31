"""The replication recipe: DistilBERT's claims, measured at the scale of 2 CPU cores.

``distilflow pipeline --preset replicate`` (run by ``scripts/replicate.py``) trains a WordPiece vocabulary,
a 6-layer teacher and a 3-layer distilled student on the shared text, then fine-tunes on SST-2 and MRPC (3
seeds, median) the teacher, the student, the same two architectures from scratch, and the student with the
fine-tuned teacher's soft targets. This module's stage turns the evaluation into the report of record:

* :func:`measure_speed` -- CPU inference rows/s of teacher and student at the same batch, same rows;
* :func:`summarise` -- per model: parameters, rows/s, held-out MLM top-1, SST-2 accuracy, MRPC F1; the
  ratios of the issue (``student_vs_teacher_sst2`` ...) and each target, met or not;
* :func:`render_markdown` -- ``replication.md``: one table, the targets, the time budget.

No Prefect here; the pipeline runs :func:`write_replication` as its ``replication`` stage.
"""

from __future__ import annotations

import glob
import inspect
import os
import platform
import time
from typing import Any

from distilflow.tasks.core.io import join, read_json, write_bytes, write_json
from distilflow.tasks.core.markdown import markdown_table

HELD_OUT_BOOK = "pg236.txt"  # The Jungle Book: the one Gutenberg book never trained on
SCRIPT = "python scripts/replicate.py --output runs/replicate"

# The targets of issue 12 (DistilBERT: 97% of BERT on GLUE, 60% faster, 40% smaller; pretraining must show).
TARGETS: list[dict[str, Any]] = [
    {"key": "student_vs_teacher_sst2", "target": 0.97, "text": "student >= 97% of the teacher's SST-2 accuracy"},
    {"key": "student_vs_teacher_mrpc", "target": 0.97, "text": "student >= 97% of the teacher's MRPC F1"},
    {"key": "speedup", "target": 1.6, "text": "student >= 1.6x the teacher's CPU inference rows/s"},
    {"key": "param_reduction", "target": 0.30, "text": "student has >= 30% fewer parameters"},
    {"key": "teacher_vs_scratch_sst2", "target": 2.0,
     "text": "teacher >= its from-scratch baseline + 2 points on SST-2"},
    {"key": "student_vs_scratch_sst2", "target": 2.0,
     "text": "student >= its from-scratch baseline + 2 points on SST-2"},
]

# model -> (benchmark suffix of its fine-tuning rows, architecture it shares speed/size with)
MODELS = {"teacher": ("-teacher", "teacher"), "student": ("", "student"),
          "teacher_scratch": ("-teacher-scratch", "teacher"), "student_scratch": ("-scratch", "student"),
          "student_task_distilled": ("-distilled", "student")}


PRECISION_TEXT = {"auto": "float32 (on a CPU; bf16 autocast on CUDA)", "fp32": "float32 everywhere",
                  "bf16": "bf16 autocast for training and fine-tuning (a CPU that computes bf16 natively)"}


def recipe(preset: str, precision: str = "auto") -> dict[str, Any]:
    """What the preset trains, in words and numbers (the report's "Recipe" section)."""
    from distilflow.tasks.pipeline.config import PRESETS, TEACHERS

    p = PRESETS[preset]
    t = TEACHERS.get(p["teacher_config"], {})
    layers = t.get("num_hidden_layers")
    return {
        "data": f"training: the Gutenberg books except {HELD_OUT_BOOK} + TinyShakespeare; held out: {HELD_OUT_BOOK}",
        "vocabulary": f"WordPiece trained on the training text, {p['vocab_size']:,} entries, uncased",
        "teacher": f"BERT {layers} x {t.get('hidden_size')} ({t.get('num_attention_heads')} heads, FFN "
                   f"{t.get('intermediate_size')}), MLM + NSP, {p['pretrain_steps']:,} steps x {p['batch_size']} "
                   f"sequences of <= {p['max_seq_len']} tokens, lr {p['pretrain_lr']:g}",
        "student": f"DistilBERT {layers // 2 if layers else '?'} x {t.get('hidden_size')}, initialised from every "
                   f"other teacher layer, DistilBERT's loss (KL at T=2 + MLM + cosine), {p['distill_steps']:,} steps "
                   f"x {p['batch_size']}, lr {p['distill_lr']:g}",
        "fine-tuning": f"SST-2 (6,920 train / 872 dev) and MRPC (3,668 train / 408 dev), {p.get('eval_seeds', 1)} "
                       f"seeds, median; " + ", ".join(f"{k} {v}" for k, v in (p.get("finetune") or {}).items())
                       + "; the same for every model; task distillation at T=2, alpha=0.5",
        "precision": PRECISION_TEXT[precision],
        **({"budget": "fine-tuning (30 runs: 5 models x 2 tasks x 3 seeds) is the largest stage (~94 min in float32 "
                      "on 2 cores, ~65 min with bf16), then pretraining (5,000 steps: ~38 min in float32, ~31 min "
                      "with bf16); 2 epochs of fine-tuning instead of BERT's 3; the vocabulary of 8k keeps the "
                      "embeddings (2.1M) small beside the layers, so halving the layers removes > 30% of the parameters"} if preset == "replicate" else {}),
    }


def pipeline_command(output: str, shared: str, preset: str = "replicate") -> str:
    """The ``distilflow pipeline`` command that ``scripts/replicate.py`` runs."""
    from distilflow.tasks.pipeline.config import PipelineConfig
    from distilflow.tasks.pipeline.plan import command_line

    train, held = replicate_inputs(shared)
    return command_line(PipelineConfig(output=output, preset=preset, inputs=tuple(train), heldout=tuple(held),  # type: ignore[arg-type]
                                       glue_dir=os.path.join(shared, "glue")))


def replicate_inputs(shared: str) -> tuple[list[str], list[str]]:
    """Training text (the Gutenberg books but one, TinyShakespeare) and the held-out book, under ``shared``."""
    books = sorted(glob.glob(os.path.join(shared, "corpus", "gutenberg", "pg*.txt")))
    held = [b for b in books if os.path.basename(b) == HELD_OUT_BOOK]
    train = [b for b in books if b not in held] + [os.path.join(shared, "corpus", "tinyshakespeare", "input.txt")]
    return train, held


def count_params(model_dir: str) -> int:
    """Parameters of the encoder (``AutoModel``: embeddings + layers (+ BERT's pooler), no task head) --
    what the DistilBERT paper compares (66M vs 110M)."""
    from transformers import AutoModel

    from distilflow.tasks.core.hf import load_pretrained

    model = load_pretrained(AutoModel, model_dir)
    return sum(p.numel() for p in model.parameters())


def measure_speed(models: dict[str, str], texts: list[str], batch_size: int, max_len: int = 128,
                  repeats: int = 3) -> dict[str, float]:
    """CPU inference rows/s of each model folder on the same ``texts`` at the same batch size.

    Tokenised once beforehand; each pass runs every batch (padded to its longest row) through the model in
    inference mode. Passes alternate between the models and each model's fastest pass counts, so a burst of
    load from other processes on a shared machine slows one pass, not the comparison.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distilflow.tasks.core.hf import load_pretrained, local_model

    loaded = {name: load_pretrained(AutoModelForSequenceClassification, path).eval() for name, path in models.items()}
    tok = AutoTokenizer.from_pretrained(local_model(next(iter(models.values()))))
    max_len = min([max_len, *(m.config.max_position_embeddings for m in loaded.values())])
    batches = [tok(texts[i:i + batch_size], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
               for i in range(0, len(texts), batch_size)]
    best = dict.fromkeys(loaded, float("inf"))
    with torch.inference_mode():
        for rep in range(repeats + 1):  # the first pass warms up (allocator, kernels) and is not counted
            for name, model in loaded.items():
                accepted = set(inspect.signature(model.forward).parameters)
                t0 = time.perf_counter()
                for b in batches:
                    model(**{k: v for k, v in b.items() if k in accepted})
                if rep:
                    best[name] = min(best[name], time.perf_counter() - t0)
    return {name: round(len(texts) / s, 1) for name, s in best.items()}


def _score(results: dict[str, Any], name: str, metric: str) -> float | None:
    r = results.get(name) or {}
    if r.get("status") == "failed":
        return None
    v = (r.get("metrics") or {}).get(metric)
    return None if v is None else round(float(v), 2)


def _runs(results: dict[str, Any], name: str, metric: str) -> list[float]:
    return [round(float(x[metric]), 2) for x in (results.get(name) or {}).get("runs", []) if metric in x]


def summarise(eval_report: dict[str, Any], params: dict[str, int], rows_per_s: dict[str, float]) -> dict[str, Any]:
    """Per model numbers, the ratios of the issue and each target met or not, from the evaluation report."""
    results = eval_report.get("results", {})
    mlm = (results.get("mlm") or {}).get("models", {})
    models: dict[str, dict[str, Any]] = {}
    for name, (suffix, arch) in MODELS.items():
        pretrained = "scratch" not in name
        models[name] = {
            "architecture": arch, "params": params.get(arch), "cpu_rows_per_s": rows_per_s.get(arch),
            "heldout_mlm_top1": (round(mlm[arch]["top1"], 2) if pretrained and name != "student_task_distilled"
                                 and arch in mlm else None),
            "sst2_acc": _score(results, f"sst2{suffix}", "accuracy"),
            "mrpc_f1": _score(results, f"mrpc{suffix}", "f1"),
            "sst2_acc_per_seed": _runs(results, f"sst2{suffix}", "accuracy"),
            "mrpc_f1_per_seed": _runs(results, f"mrpc{suffix}", "f1"),
        }
    t, s = models["teacher"], models["student"]
    ratios = {
        "student_vs_teacher_sst2": _ratio(s["sst2_acc"], t["sst2_acc"]),
        "student_vs_teacher_mrpc": _ratio(s["mrpc_f1"], t["mrpc_f1"]),
        "speedup": _ratio(s["cpu_rows_per_s"], t["cpu_rows_per_s"]),
        "param_reduction": (None if not (s["params"] and t["params"]) else round(1 - s["params"] / t["params"], 4)),
        "teacher_vs_scratch_sst2": _points(t["sst2_acc"], models["teacher_scratch"]["sst2_acc"]),
        "student_vs_scratch_sst2": _points(s["sst2_acc"], models["student_scratch"]["sst2_acc"]),
        # beyond the list: the task-distilled student (DistilBERT's second step) against the teacher
        "task_distilled_vs_teacher_sst2": _ratio(models["student_task_distilled"]["sst2_acc"], t["sst2_acc"]),
        "task_distilled_vs_teacher_mrpc": _ratio(models["student_task_distilled"]["mrpc_f1"], t["mrpc_f1"]),
    }
    targets = [{**tg, "value": ratios[tg["key"]],
                "met": None if ratios[tg["key"]] is None else bool(ratios[tg["key"]] >= tg["target"])}
               for tg in TARGETS]
    return {"models": models, **ratios, "targets": targets}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def write_replication(output: str, eval_dir: str, teacher: str, student: str, glue_dir: str, *, preset: str,
                      speed_batch: int, speed_rows: int, command: str, stage_seconds: dict[str, float],
                      estimate: dict[str, float] | None = None, precision: str = "auto") -> dict[str, Any]:
    """The pipeline's replication stage: ``OUT/replication.json`` and ``OUT/replication.md``.

    Speed is measured on the SST-2 classifiers of the first seed (teacher and plain student: the same head
    on each encoder) over the first ``speed_rows`` SST-2 dev sentences.
    """
    from distilflow.tasks.evaluate.glue import find_task_files, read_glue_file

    report = read_json(join(eval_dir, "results.json"))
    results = report["results"]
    classifiers = {arch: results[f"sst2{sfx}"]["runs"][0]["model_dir"]
                   for arch, sfx in (("teacher", "-teacher"), ("student", "")) if results.get(f"sst2{sfx}", {}).get("runs")}
    texts = [e.text_a for e in read_glue_file(find_task_files(glue_dir, "sst2").dev, "sst2").examples][:speed_rows]
    max_len = int(report["config"].get("max_seq_len") or 128)  # what the classifiers were fine-tuned with
    rows_per_s = measure_speed(classifiers, texts, speed_batch, max_len=max_len) if len(classifiers) == 2 else {}
    params = {"teacher": count_params(teacher), "student": count_params(student)}
    summary = summarise(report, params, rows_per_s)
    import torch

    script = SCRIPT if preset == "replicate" else f"python scripts/replicate.py --output {output} --tiny"
    script += f" --precision {precision}" if precision != "auto" else ""
    doc = {"status": "run", "preset": preset, "command": command, "script": script, "recipe": recipe(preset, precision),
           **summary,
           "speed": {"batch_size": speed_batch, "rows": len(texts), "threads": torch.get_num_threads(), "max_len": max_len,
                     "inputs": "SST-2 dev sentences, each model's SST-2 classifier (seed 1 of 3)"},
           "finetuning": {k: report["config"].get(k) for k in ("lr", "epochs", "batch_size", "max_seq_len", "seeds",
                                                              "kd_temperature", "kd_alpha", "max_train_examples")},
           "stage_seconds": stage_seconds, "estimate_seconds": estimate or {},
           "environment": {**report.get("environment", {}), "machine": platform.machine(),
                           "cpus": os.cpu_count()}}
    write_json(join(output, "replication.json"), doc)
    write_bytes(join(output, "replication.md"), render_markdown(doc).encode())
    return {"replication": join(output, "replication.md"), **{t["key"]: t["value"] for t in summary["targets"]}}


def render_markdown(doc: dict[str, Any]) -> str:
    """``replication.md``: how to run it, the one results table, the targets (met / not met), the time."""
    names = {"teacher": "teacher (pretrained)", "student": "student (distilled)",
             "teacher_scratch": "teacher architecture, from scratch", "student_scratch": "student architecture, from scratch",
             "student_task_distilled": "student + task distillation"}
    rows = [{"model": names[k], "params": _cell(m["params"]), "CPU rows/s": _cell(m["cpu_rows_per_s"]),
             "held-out MLM top-1 %": _cell(m["heldout_mlm_top1"]), "SST-2 acc (median)": _cell(m["sst2_acc"]),
             "MRPC F1 (median)": _cell(m["mrpc_f1"]),
             "per seed SST-2 / MRPC": f"{_seq(m['sst2_acc_per_seed'])} / {_seq(m['mrpc_f1_per_seed'])}"}
            for k, m in doc["models"].items()]
    out = ["# Replicating DistilBERT's claims on 2 CPU cores", "",
           f"Status: **{doc['status']}** (preset `{doc['preset']}`).", "",
           f"Command: `{doc.get('script', SCRIPT)}`, which runs", "", f"    {doc['command']}", "",
           "and copies `OUT/replication.md` / `OUT/replication.json` here. Resumable: rerun the same command "
           "after an interruption; finished stages, training checkpoints and fine-tuning seeds are kept.", "",
           *(["## Recipe", "", *(f"- {k}: {v}" for k, v in doc["recipe"].items()), ""] if doc.get("recipe") else []),
           "## Results", "", markdown_table(rows), "",
           "Speed: " + (f"{doc['speed']['rows']} {doc['speed']['inputs']}, batch {doc['speed']['batch_size']}, "
                        f"{doc['speed']['threads']} torch threads; best of 3 alternating passes." if doc.get("speed")
                        else "not measured yet."),
           "From-scratch rows: the same architecture with random weights and the same fine-tuning, so the gap to "
           "the pretrained row is what pretraining brought. Held-out MLM: masked-token top-1 on the held-out "
           "book (not defined for the random-init models).", "", "## Targets", ""]
    for t in doc["targets"]:
        v = t["value"]
        state = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        shown = "-" if v is None else (f"{v:.2f} points" if t["key"].endswith("scratch_sst2") else f"{v:.3f}")
        out.append(f"- {t['text']}: {shown} (target {t['target']}) -- {state}")
    out += ["", "Task distillation (beyond the targets): student + soft targets vs teacher: SST-2 "
            f"{_cell(doc.get('task_distilled_vs_teacher_sst2'))}, MRPC {_cell(doc.get('task_distilled_vs_teacher_mrpc'))}.",
            "", "## Time", ""]
    est, ran = doc.get("estimate_seconds") or {}, doc.get("stage_seconds") or {}
    if est:
        out.append("Estimated for an otherwise idle 2-core machine, from short measured runs "
                   "(`scripts/replicate_estimate.py`): " + ", ".join(f"{k} {_dur(v)}" for k, v in est.items())
                   + f"; **total {_dur(sum(est.values()))}**.")
    m = doc.get("estimate_measurements") or {}
    if m.get("pretrain"):
        par = m.get("parallel_assumed", 1.7)
        ft = m.get("finetune", {})
        out += ["", "What the estimate rests on (`" + m.get("command", "") + "`; one torch thread, CPU seconds, "
                f"so other load on the machine inflates it little; an idle 2-thread run is assumed to do {par} cores' "
                "worth of work):", "",
                f"- pretrain: {m['pretrain']['cpu_s_per_step']} CPU s per step of 32 x 128 tokens",
                f"- distill: {m['distill']['cpu_s_per_step']} CPU s per step (teacher forward + student)",
                *(f"- fine-tune {k}: {v['cpu_s_per_example'] * 1000:.1f} CPU ms per example ({v['n_train']:,} "
                  "training examples)" for k, v in ft.items()),
                "- per fine-tuning run another ~5 s (load, tokenise, save) and scoring dev (a forward pass)"]
    arch = doc.get("architecture_check")
    if arch:
        out += ["", f"Architecture check before the run (the short-run models; weights change neither number): teacher "
                f"{arch['params']['teacher']:,} / student {arch['params']['student']:,} parameters "
                f"(reduction {arch['param_reduction']:.1%}); CPU inference {arch['cpu_rows_per_s']['teacher']} / "
                f"{arch['cpu_rows_per_s']['student']} rows/s on {arch['rows']} SST-2 dev sentences at batch "
                f"{arch['batch_size']}, {arch['threads']} threads (speed-up {arch['speedup']:.2f}x; measured on the "
                f"shared machine, load {arch['load'][0]:.1f})."]
    if ran:
        out += ["", "Measured (this run, per pipeline stage): " + ", ".join(f"{k} {_dur(v)}" for k, v in ran.items())
                + f"; total {_dur(sum(ran.values()))}."]
    env = doc.get("environment") or {}
    if env:
        out += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "."]
    return "\n".join(out) + "\n"


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _seq(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs) or "-"


def planned_doc(preset: str, command: str, estimate: dict[str, float], measured: dict[str, Any]) -> dict[str, Any]:
    """The report before the run of record: the same structure, no results, the estimate and what it rests on."""
    empty = summarise({"results": {}}, {}, {})
    return {"status": "not run yet (estimate only): the run needs this 2-core machine to itself for about the "
                      "estimated time below", "preset": preset, "command": command, "script": SCRIPT,
            "recipe": recipe(preset), **empty, "speed": None, "stage_seconds": {}, "estimate_seconds": estimate,
            "estimate_measurements": measured}


def write_plan(folder: str, doc: dict[str, Any]) -> None:
    """``replication.json`` / ``replication.md`` of a planned (not yet run) replication."""
    write_json(join(folder, "replication.json"), doc)
    write_bytes(join(folder, "replication.md"), render_markdown(doc).encode())
