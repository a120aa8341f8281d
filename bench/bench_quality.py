"""Held-out accuracy of `cnnflow` with its defaults, against a plain script and `cnnflow tune`.

    python bench/bench_quality.py [--sets photo,shapes10,icons,digits] [--scale 1.0]
        [--workdir DIR] [--skip-tune] [--trials N] [--time-budget S] [--repeat K]
    python bench/bench_quality.py --sets photo,shapes10 --vary lr=2e-3,4e-3,8e-3

Issue #11: are cnnflow's defaults good? On four generated sets that differ the way real
data differs (bench/quality_data.py: small animals in cluttered JPEG photos, 10 classes of
tiny shapes, RGBA icons whose shape is only in alpha, scikit-learn's digits), each with
files never shown to prep, it measures held-out accuracy and wall time of:

  defaults  cnnflow prep (64 px for photo, 32 px otherwise), then `cnnflow train SHARDS
            --register-as bench-<set> --experiment bench-quality` and no other flag, then
            `cnnflow predict` on the held-out folder with the version it registered
  plain     bench/plain_script.py: the thirty-line PyTorch script a practitioner writes,
            given the same training files as cnnflow's train split (prep's val split
            is left out of both)
  tune      `cnnflow tune SHARDS --register-as bench-<set>-tune` (+ --trials,
            --time-budget if given), then predict with the version it registered

and prints one table (a row per set, then the overall mean) with the differences
defaults - plain and tune - defaults, in accuracy points. Wall times: defaults is train +
predict and tune is tune + predict, each subprocess whole (imports, Ray start-up); prep
is shown on its own (both share it); plain is the script's own load + train + score, in
this process. `--repeat K` trains defaults and plain K times with seeds 0..K-1 (cnnflow
train --seed for K > 0) and shows mean ± standard deviation. The results also go to
WORKDIR/results.json, and everything cnnflow prints to WORKDIR/bench-quality.log. Not run
in CI: at scale 1 it takes many minutes of CPU; `--scale 0.1 --skip-tune` is a smoke test.

`--vary OPTION=V1,V2,...` is how a default is settled: it trains the defaults column once
per value (`cnnflow train ... --OPTION V`; the value `default` passes no flag), skips plain
and tune, and prints held-out accuracy per value and set (WORKDIR/sweep-OPTION.json).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import plain_script  # noqa: E402  (bench/ is on sys.path)
import quality_data  # noqa: E402

IMAGE_SIZE = {"photo": 64, "shapes10": 32, "icons": 32, "digits": 32}
EXPERIMENT = "bench-quality"


class Runner:
    """Runs cnnflow subprocesses with their output appended to one log file."""

    def __init__(self, workdir: Path, num_cpus: int | None = None):
        self.workdir = workdir
        self.num_cpus = num_cpus
        self.log = workdir / "bench-quality.log"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
        self.cnnflow = shutil.which("cnnflow") or str(Path(sys.executable).with_name("cnnflow"))

    def __call__(self, *args: str) -> tuple[int, float, str]:
        """(return code, seconds, what it printed)."""
        cmd = [self.cnnflow, *args]
        if self.num_cpus and args[0] in ("prep", "train", "tune", "predict"):
            cmd += ["--num-cpus", str(self.num_cpus)]
        with open(self.log, "a") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} $ {' '.join(['cnnflow', *args])}\n")
            log.flush()
            begin = log.tell()
            start = time.perf_counter()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir).returncode
            seconds = time.perf_counter() - start
        with open(self.log) as log:
            log.seek(begin)
            output = log.read()
        with open(self.log, "a") as log:
            log.write(f"=== exit {rc} after {seconds:.1f} s\n")
        return rc, seconds, output


def registered_version(output: str, name: str, runner: Runner) -> int | None:
    """The version a train/tune run registered: from its output, else the newest in MLflow."""
    found = re.findall(rf"registered {re.escape(name)} v(\d+)", output)
    if found:
        return int(found[-1])
    try:
        from mlflow.tracking import MlflowClient

        versions = MlflowClient(runner.env["MLFLOW_TRACKING_URI"]).search_model_versions(f"name = '{name}'")
        return max(int(v.version) for v in versions) if versions else None
    except Exception:  # noqa: BLE001 - a missing version is reported as a failed step
        return None


def prediction_accuracy(pred_dir: Path, n_heldout: int) -> float:
    """Share of the held-out files whose predicted label is their class folder (missing = wrong)."""
    import pyarrow.parquet as pq

    correct = rows = 0
    for part in sorted(pred_dir.rglob("*.parquet")):
        table = pq.read_table(part, columns=["path", "label"])
        for path, label in zip(table["path"].to_pylist(), table["label"].to_pylist()):
            rows += 1
            correct += label is not None and label == Path(path).parent.name
    if rows != n_heldout:
        print(f"    warning: {rows} prediction rows for {n_heldout} held-out files")
    return correct / n_heldout


def shard_files(shards: Path, prep_input: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """cnnflow's train split as (file, label index), and the manifest's classes."""
    import pyarrow.parquet as pq

    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    files = []
    for part in sorted((shards / "train").rglob("*.parquet")):
        table = pq.read_table(part, columns=["path", "label"])
        files += [(prep_input / p, int(y)) for p, y in zip(table["path"].to_pylist(), table["label"].to_pylist())]
    return sorted(files, key=lambda f: str(f[0])), classes


def train_and_predict(run: Runner, name: str, heldout: Path, n_heldout: int, work: Path, command: list[str],
                      register_as: str, pred_name: str) -> dict:  # fmt: skip
    """`cnnflow train|tune ...` then `cnnflow predict` with the version it registered."""
    rc, train_s, out = run(*command)
    if rc != 0:
        return {"error": f"{command[0]} exited {rc}", "seconds": train_s}
    version = registered_version(out, register_as, run)
    if version is None:
        return {"error": f"{command[0]} registered no version of {register_as}", "seconds": train_s}
    pred = work / pred_name
    shutil.rmtree(pred, ignore_errors=True)  # predict resumes into a folder; start clean
    rc, pred_s, _ = run("predict", str(heldout), str(pred), "--model", f"models:/{register_as}/{version}")
    if rc != 0:
        return {"error": f"predict exited {rc}", "seconds": train_s + pred_s, "version": version}
    accuracy = prediction_accuracy(pred, n_heldout)
    return {"accuracy": accuracy, "seconds": train_s + pred_s, "train_seconds": train_s,
            "predict_seconds": pred_s, "version": version}  # fmt: skip


def tune_help(run: Runner) -> str | None:
    rc, _, out = run("tune", "--help")
    return out if rc == 0 else None


def summarise(results: list[dict]) -> dict:
    """Mean and standard deviation of accuracy and seconds over repeats that worked."""
    ok = [r for r in results if "accuracy" in r]
    if not ok:
        return {"runs": results, "error": results[0].get("error", "failed") if results else "not run"}
    acc, sec = [r["accuracy"] for r in ok], [r["seconds"] for r in ok]
    return {
        "accuracy": statistics.fmean(acc),
        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "seconds": statistics.fmean(sec),
        "seconds_std": statistics.stdev(sec) if len(sec) > 1 else 0.0,
        "runs": results,
    }


def bench_set(name: str, args: argparse.Namespace, run: Runner, help_text: str | None) -> dict:
    work = args.workdir / name
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    folder = quality_data.make_set(name, args.workdir / "data", scale=args.scale)
    meta = json.loads((folder / "dataset.json").read_text())
    train_dir, heldout_dir = folder / "train", folder / "heldout"
    n_heldout = sum(1 for p in heldout_dir.rglob("*") if p.is_file())
    print(f"[{name}] data: {meta['counts']['train']:,} train + {n_heldout:,} held-out files, "
          f"{len(meta['classes'])} classes ({time.perf_counter() - start:.1f} s; written in {meta['seconds']} s)")  # fmt: skip

    size = IMAGE_SIZE[name]
    shards = work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    rc, prep_s, _ = run("prep", str(train_dir), str(shards), "--image-size", str(size))
    result: dict = {"set": name, "image_size": size, "classes": meta["classes"], "heldout_files": n_heldout,
                    "prep_seconds": prep_s}  # fmt: skip
    if rc != 0:
        print(f"[{name}] prep failed (exit {rc}), see {run.log}")
        return {**result, "error": f"prep exited {rc}"}
    train_files, classes = shard_files(shards, train_dir)
    index = {c: k for k, c in enumerate(classes)}
    # a class the train split lacks (only at tiny scales) gets -1: always wrong, as for cnnflow
    heldout_files = [(p, index.get(p.parent.name, -1)) for p in sorted(heldout_dir.rglob("*")) if p.is_file()]
    result["train_files"] = len(train_files)
    print(f"[{name}] prep {prep_s:.1f} s: {len(train_files):,} files in the train split at {size} px")

    defaults, plain = [], []
    for seed in range(0 if args.tune_only else args.repeat):
        command = ["train", str(shards), "--register-as", f"bench-{name}", "--experiment", EXPERIMENT]
        command += ["--seed", str(seed)] if seed else []  # seed 0 is the default: no flag at all
        d = train_and_predict(run, name, heldout_dir, n_heldout, work, command, f"bench-{name}",
                              "pred-defaults" + (f"-seed{seed}" if seed else ""))  # fmt: skip
        d["seed"] = seed
        defaults.append(d)
        print(f"[{name}] defaults seed {seed}: " + (f"held-out {d['accuracy']:.4f}, {d['seconds']:.1f} s "
              f"(train {d['train_seconds']:.1f} + predict {d['predict_seconds']:.1f}), v{d['version']}"
              if "accuracy" in d else f"{d['error']}, see {run.log}"))  # fmt: skip
        p = plain_script.train_and_score(train_files, heldout_files, size, seed=seed)
        p["seed"] = seed
        plain.append(p)
        print(f"[{name}] plain seed {seed}: held-out {p['accuracy']:.4f}, {p['seconds']:.1f} s")
    result["defaults"], result["plain"] = summarise(defaults), summarise(plain)
    if args.tune_only:
        result["defaults"] = result["plain"] = {"skipped": True}

    if args.skip_tune:
        result["tune"] = {"skipped": True}
    elif help_text is None:
        result["tune"] = {"error": "not available"}
        print(f"[{name}] tune: not available")
    else:
        command = ["tune", str(shards), "--register-as", f"bench-{name}-tune"]
        command += ["--experiment", EXPERIMENT] if "--experiment" in help_text else []
        command += ["--trials", str(args.trials)] if args.trials is not None else []
        command += ["--time-budget", str(args.time_budget)] if args.time_budget is not None else []
        t = train_and_predict(run, name, heldout_dir, n_heldout, work, command, f"bench-{name}-tune", "pred-tune")
        result["tune"] = t
        print(f"[{name}] tune: " + (f"held-out {t['accuracy']:.4f}, {t['seconds']:.1f} s, v{t['version']}"
              if "accuracy" in t else f"{t['error']}, see {run.log}"))  # fmt: skip
    return result


def sweep_set(name: str, option: str, values: list[str], args: argparse.Namespace, run: Runner) -> dict:
    """Held-out accuracy of the defaults with `--OPTION V` for each value, on one set."""
    folder = quality_data.make_set(name, args.workdir / "data", scale=args.scale)
    heldout_dir = folder / "heldout"
    n_heldout = sum(1 for p in heldout_dir.rglob("*") if p.is_file())
    shards = args.workdir / name / "shards"
    if not (shards / "manifest.json").exists():
        rc, _, _ = run("prep", str(folder / "train"), str(shards), "--image-size", str(IMAGE_SIZE[name]))
        if rc != 0:
            return {"set": name, "error": f"prep exited {rc}"}
    rows = {}
    for value in values:
        tag = f"bench-{name}-{option}-{value}".replace(".", "_")
        command = ["train", str(shards), "--register-as", tag, "--experiment", f"{EXPERIMENT}-sweep"]
        command += [] if value == "default" else [f"--{option.replace('_', '-')}", value]
        rows[value] = r = train_and_predict(run, name, heldout_dir, n_heldout, args.workdir / name, command, tag,
                                            f"pred-{option}-{value}")  # fmt: skip
        print(f"[{name}] --{option} {value}: " + (f"held-out {r['accuracy']:.4f}, train {r['train_seconds']:.1f} s"
              if "accuracy" in r else f"{r['error']}, see {run.log}"))  # fmt: skip
    return {"set": name, "values": rows}


def print_sweep(option: str, values: list[str], results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Held-out accuracy of the defaults by --{option} (train seconds)")
    table.add_column(option)
    for r in results:
        table.add_column(r["set"], justify="right")
    table.add_column("mean", justify="right")
    for value in values:
        cells, accs = [], []
        for r in results:
            entry = r.get("values", {}).get(value, {})
            if "accuracy" in entry:
                accs.append(entry["accuracy"])
                cells.append(f"{entry['accuracy']:.3f} ({entry['train_seconds']:.0f})")
            else:
                cells.append(entry.get("error", r.get("error", "failed")))
        mean = f"{statistics.fmean(accs):.3f}" if len(accs) == len(results) else "-"
        table.add_row(value, *cells, mean)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


# --- the table ---------------------------------------------------------------------------


def _acc(entry: dict | None) -> str:
    if not entry or entry.get("skipped"):
        return "skipped"
    if "accuracy" not in entry:
        return entry.get("error", "failed")
    std = entry.get("accuracy_std")
    return f"{entry['accuracy']:.3f}" + (f" ± {std:.3f}" if std else "")


def _sec(entry: dict | None) -> str:
    return f"{entry['seconds']:.0f}" if entry and "accuracy" in entry else "-"


def _diff(a: dict | None, b: dict | None) -> str:
    if a and b and "accuracy" in a and "accuracy" in b:
        return f"{100 * (a['accuracy'] - b['accuracy']):+.1f}"
    return "-"


def overall(results: list[dict]) -> dict:
    """Unweighted means over the sets where a column worked; seconds summed."""
    out: dict = {"sets": [r["set"] for r in results]}
    for key in ("defaults", "plain", "tune"):
        ok = [r[key] for r in results if "accuracy" in r.get(key, {})]
        if ok and len(ok) == len(results):
            out[key] = {"accuracy": statistics.fmean(e["accuracy"] for e in ok), "seconds": sum(e["seconds"] for e in ok)}
    out["prep_seconds"] = sum(r.get("prep_seconds", 0) for r in results)
    return out


def print_table(results: list[dict], total: dict, repeat: int) -> None:
    from rich.console import Console
    from rich.table import Table

    spread = " (mean ± sd)" if repeat > 1 else ""
    table = Table(title=f"Held-out accuracy and wall seconds{spread}; differences in accuracy points")
    for col in ("set", "train/held-out", "prep s", "defaults", "s", "plain", "s", "tune", "s",
                "defaults-plain", "tune-defaults"):  # fmt: skip
        table.add_column(col, justify="left" if col == "set" else "right", no_wrap=True)
    for r in results:
        if "defaults" not in r:
            table.add_row(r["set"], "-", f"{r.get('prep_seconds', 0):.0f}", r.get("error", "failed"), *["-"] * 7)
            continue
        table.add_row(
            r["set"], f"{r['train_files']:,}/{r['heldout_files']:,}", f"{r['prep_seconds']:.0f}",
            _acc(r["defaults"]), _sec(r["defaults"]), _acc(r["plain"]), _sec(r["plain"]),
            _acc(r["tune"]), _sec(r["tune"]), _diff(r["defaults"], r["plain"]), _diff(r["tune"], r["defaults"]),
        )  # fmt: skip
    if len(results) > 1:
        table.add_section()
        d, p, t = total.get("defaults"), total.get("plain"), total.get("tune")
        tune = t or next((r["tune"] for r in results if "accuracy" not in r.get("tune", {})), None)
        table.add_row(
            "overall", "", f"{total['prep_seconds']:.0f}", _acc(d), _sec(d), _acc(p), _sec(p), _acc(tune), _sec(t),
            _diff(d, p), _diff(t, d),
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # a log file gets it whole


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(quality_data.SETS), help="comma-separated: " + ",".join(quality_data.SETS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the file counts (0.1: smoke test)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cnnflow-bench-quality")
    parser.add_argument("--skip-tune", action="store_true", help="leave out `cnnflow tune`")
    parser.add_argument("--tune-only", action="store_true", help="leave out defaults and plain")
    parser.add_argument("--trials", type=int, default=None, help="cnnflow tune --trials (default: tune's)")
    parser.add_argument("--time-budget", type=float, default=None, help="cnnflow tune --time-budget, seconds (default: tune's)")
    parser.add_argument("--repeat", type=int, default=1, help="train defaults and plain with seeds 0..K-1")
    parser.add_argument("--vary", metavar="OPTION=V1,V2", help="sweep one train option; skips plain and tune")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs for each cnnflow command's local Ray (to run benches side by side)")
    args = parser.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in quality_data.SETS]
    if unknown or args.repeat < 1:
        parser.error(f"unknown sets {unknown}" if unknown else "--repeat must be at least 1")
    if args.time_budget is not None and args.time_budget == int(args.time_budget):
        args.time_budget = int(args.time_budget)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    run = Runner(args.workdir, args.num_cpus)
    print(f"workdir {args.workdir}; cnnflow output goes to {run.log}")
    if args.vary:
        option, _, values = args.vary.partition("=")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not option or not values:
            parser.error("--vary takes OPTION=V1,V2,...")
        results = [sweep_set(name, option, values, args, run) for name in sets]
        print_sweep(option, values, results)
        out = args.workdir / f"sweep-{option}.json"
        out.write_text(json.dumps({"argv": sys.argv[1:], "sets": results}, indent=2, default=str) + "\n")
        print(f"results: {out}")
        return
    help_text = None if args.skip_tune else tune_help(run)
    if not args.skip_tune and help_text is None:
        print("tune: not available (`cnnflow tune --help` failed); its column stays empty")
    start = time.perf_counter()
    results = [bench_set(name, args, run, help_text) for name in sets]
    total = overall(results)
    print_table(results, total, args.repeat)
    payload = {"argv": sys.argv[1:], "scale": args.scale, "repeat": args.repeat, "sets": results, "overall": total,
               "log": str(run.log), "seconds": time.perf_counter() - start}  # fmt: skip
    out = args.workdir / "results.json"
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results: {out}  ({payload['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
