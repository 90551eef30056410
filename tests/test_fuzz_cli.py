"""Generated families of bad input for every command line: each must be refused at the door.

For every case the stage must exit non-zero with exactly one line starting with `error:` (argparse's
own `<script>.py: error:` counts for the scripts that still use it) naming the problem, print no
traceback, write nothing and leave nothing behind in the case's folder, and leave the earlier output
there unchanged. Cases are generated from a seeded random source, so the same families come back on
every run: bad numbers for every numeric flag (zero, negative, fractional, non-finite, not a number),
damaged and foreign files for every file argument (empty, random bytes, truncated, another kind of
checkpoint, a code-running pickle, a weight set to NaN or infinity), damaged data folders, damaged
pairs.csv files, and outputs that cannot be written (a file, a folder, a path under a file, a
folder another process is writing). Cases run in this process through `main(argv)`; a sample also
runs as a real subprocess. Cases the other stages do not refuse cleanly yet are expected failures
with the reason, so they show up as fixed when they are.
"""
import contextlib
import hashlib
import io
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from common import output_lock
from conftest import ROOT, poisoned_copy, run_script

ERROR_LINE = re.compile(r"^(?:[\w.-]+\.py: )?error: ")
MINE = ("select_pairs.py", "scoremix_sample.py", "cka.py")  # stages that print only the one line
SUBPROCESS_EVERY = 25  # every 25th case also runs as a subprocess


@dataclass
class Case:
    stage: str
    name: str
    argv: list  # strings; {ws}, {toy}, {fr}, {snap}, {bad} ... are filled in per case
    needle: str = ""  # a word the error line must contain (formatted like argv)
    setup: str = ""  # a preparation of the case folder: see prepare()
    xfail: str = ""  # why this stage does not refuse it cleanly yet
    slow: bool = False  # an expected failure that would do real work: not run at all
    subprocess: bool = False
    extra: dict = field(default_factory=dict)

# ----------------------------------------------------------------------------- value families


def bad_numbers(kind, rng, n=4):
    """n distinct bad spellings for a flag of this kind (positive, non-negative, probability, int ...)."""
    words = ["", "abc", "1e", "--", "0x1g", "½", "1,5", " "]
    pool = {"positive_int": ["0", str(-rng.randint(1, 10 ** 6)), f"{rng.random() + 0.5:.3f}", "nan",
                             rng.choice(words), "-0"],
            "non_negative_int": [str(-rng.randint(1, 10 ** 6)), f"{rng.random() + 0.1:.2f}", "inf",
                                 rng.choice(words), "-1"],
            "positive_float": ["0", f"{-rng.random() * 10 ** rng.randint(0, 9):.4g}", "nan", "inf", "-inf",
                               rng.choice(words)],
            "non_negative_float": [f"{-rng.random() * 10 ** rng.randint(-3, 9):.4g}", "nan", "-inf", "inf",
                                   rng.choice(words)],
            "probability": [f"{1 + rng.random() * 10 ** rng.randint(-4, 3):.6g}", f"{-rng.random():.4g}", "nan",
                            "inf", rng.choice(words)],
            "finite_float": ["nan", "inf", "-inf", rng.choice(words)]}[kind]
    rng.shuffle(pool)
    return list(dict.fromkeys(pool))[:n]


BAD_FILES = {  # name -> what it is (made by make_bad_files); every checkpoint argument gets each
    "missing.pt": "a path that does not exist",
    "folder.pt": "a folder",
    "empty.pt": "an empty file",
    "noise0.pt": "random bytes", "noise1.pt": "random bytes",
    "text.pt": "a text file",
    "truncated_fr.pt": "a model.pt cut short", "truncated_snap.pt": "a snapshot cut short",
    "evil.pt": "a pickle that would run code when loaded",
    "dict.pt": "a torch file holding a dict of the wrong kind",
    "list.pt": "a torch file holding a list",
    "nan_fr.pt": "a model.pt with a NaN weight", "inf_fr.pt": "a model.pt with an infinite weight",
    "nan_snap.pt": "a snapshot with a NaN weight", "inf_snap.pt": "a snapshot with an infinite weight",
    "nan_label_snap.pt": "a snapshot whose class embedding holds NaN",
}
FR_KINDS = [f for f in BAD_FILES if "snap" not in f] + ["truncated_snap.pt", "nan_snap.pt"]
SNAP_KINDS = [f for f in BAD_FILES if "_fr" not in f] + ["nan_fr.pt"]


def make_bad_files(folder, fr, snap):
    rng = random.Random(1)
    os.makedirs(folder / "folder.pt")
    (folder / "empty.pt").write_bytes(b"")
    for i in range(2):
        (folder / f"noise{i}.pt").write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096))))
    (folder / "text.pt").write_text("class_a,class_b\nid0,id1\n")
    for src, name in ((fr, "truncated_fr.pt"), (snap, "truncated_snap.pt")):
        data = open(src, "rb").read()
        (folder / name).write_bytes(data[:rng.randint(10, len(data) - 10)])
    marker = folder / "evil-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (folder / "evil.pt").write_bytes(pickle.dumps({"config": Evil(), "state_dict": {}, "ema": Evil()}))
    torch.save({"config": {"depth": 18}, "weights": [1, 2]}, folder / "dict.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    poisoned_copy(fr, folder / "nan_fr.pt")
    poisoned_copy(fr, folder / "inf_fr.pt", value=float("inf"))
    poisoned_copy(snap, folder / "nan_snap.pt", "unet.conv_in.weight")
    poisoned_copy(snap, folder / "inf_snap.pt", "unet.out_conv.bias", float("-inf"))
    poisoned_copy(snap, folder / "nan_label_snap.pt", "unet.emb_label.weight")
    return marker


def make_bad_data(folder, toy_train):
    """Damaged image folders: -> {name: path}."""
    (folder / "data_empty").mkdir()
    (folder / "data_file").write_text("not a folder")
    shutil.copytree(toy_train, folder / "data_corrupt")
    first = sorted(os.listdir(folder / "data_corrupt"))[0]
    image = sorted(os.listdir(folder / "data_corrupt" / first))[0]
    (folder / "data_corrupt" / first / image).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "data_no_images").mkdir()
    (folder / "data_no_images" / "id0").mkdir()
    (folder / "data_no_images" / "id0" / "notes.txt").write_text("no images")
    return ["data_empty", "data_file", "data_corrupt", "data_no_images", "data_missing"]


def pairs_files(rng, n):
    """n generated damaged pairs.csv files: -> [(name, bytes, needle)]. Classes id00000..id00005 exist."""
    known = [f"id{i:05d}" for i in range(6)]

    def name():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_0123456789") for _ in range(rng.randint(1, 12)))

    def csv_bytes(rows, encoding="utf-8"):
        return "".join(",".join(r) + "\n" for r in rows).encode(encoding)

    makers = [
        lambda: (csv_bytes([["class_a", "class_b"], [rng.choice(known), "x" + name()]]), "unknown class"),
        lambda: (csv_bytes([["class_a", "class_b", "class_c"], *[[c, c, rng.choice(known)] for c in
                            rng.sample(known, 1)]]), "appears twice"),
        lambda: (csv_bytes([[rng.choice(["class_x", "a", "Class_A", "class a"]), "class_b"], known[:2]]),
                 "no column 'class_a'"),
        lambda: (csv_bytes([["class_a", rng.choice(["", "classb", "b"])], known[:2]]), "no column 'class_b'"),
        lambda: (csv_bytes([["class_a", "class_b"]]), "no pairs"),
        lambda: (b"", "no column"),
        lambda: (csv_bytes([["class_a", "class_b"], known[:2], known[:rng.choice([1, 3])]]), "fields"),
        lambda: (csv_bytes([["class_a", "class_b"], [known[0], ""]]), "empty class_b"),
        lambda: (bytes(rng.randrange(128, 256) for _ in range(rng.randint(2, 300))), "UTF-8"),
        lambda: (csv_bytes([["class_a", "class_b"], known[:2]], "utf-16"), "UTF-8"),
        lambda: (b"class_a,class_b\n" + known[0].encode() + b",\x00" + known[1].encode() + b"\n", "line 2"),
    ]
    out = []
    for i in range(n):
        data, needle = makers[i % len(makers)]()
        out.append((f"pairs{i}.csv", data, needle))
    return out

# ----------------------------------------------------------------------------- the cases


def flag_cases(stage, base, flags, rng, unchecked=(), reason="", run=False):
    """Every numeric flag of a stage, each with a few generated bad values. For the flags in
    `unchecked` (the stage does not range-check them yet) a value argparse cannot convert is still
    refused; a number is an expected failure (not run unless `run`: the stage would do the work)."""
    cases = []
    for flag, kind in flags.items():
        for value in bad_numbers(kind, rng):
            case = Case(stage, f"{flag}={value!r}", [*base, flag, value], needle=flag)
            if flag in unchecked and converts(value, kind):
                case.xfail, case.slow = reason or f"{stage} does not range-check {flag} yet", not run
            cases.append(case)
    return cases


def converts(value, kind):
    """Whether argparse's plain int / float type accepts the text (so only a range check refuses it)."""
    try:
        (int if kind.endswith("int") else float)(value)
        return True
    except ValueError:
        return False


def select_pairs_cases(rng):
    base = ["--fr", "{fr}", "--data", "{toy}", "--out", "{ws}/pairs.csv"]
    cond = ["--space", "condition", "--generator", "{snap}", "--out", "{ws}/pairs.csv"]
    cases = flag_cases("select_pairs.py", base, {
        "--num-pairs": "positive_int", "--max-uses": "positive_int", "--batch-size": "positive_int",
        "--workers": "non_negative_int", "--seed": "non_negative_int", "--max-matrix-gb": "non_negative_float",
        "--tuple-size": "positive_int"}, rng)
    cases += [Case("select_pairs.py", f"--fr {k}", ["--fr", "{bad}/" + k, "--data", "{toy}", "--out",
                                                    "{ws}/pairs.csv"], needle=k) for k in FR_KINDS]
    cases += [Case("select_pairs.py", f"--generator {k}", ["--space", "condition", "--generator", "{bad}/" + k,
                                                           "--out", "{ws}/pairs.csv"], needle=k)
              for k in SNAP_KINDS]
    cases += [Case("select_pairs.py", f"--data {d}", ["--fr", "{fr}", "--data", "{bad}/" + d, "--out",
                                                      "{ws}/pairs.csv"], needle=d) for d in BAD_DATA]
    for n in rng.sample(range(16, 10 ** 6), 3):
        cases.append(Case("select_pairs.py", f"--num-pairs {n}", [*cond, "--num-pairs", n], needle="at most 15"))
        cases.append(Case("select_pairs.py", f"triplets {n}", [*cond, "--tuple-size", 3, "--num-pairs", n + 5],
                          needle="at most 20"))
    cases += out_cases("select_pairs.py", cond, "{ws}/pairs.csv", is_dir=False)
    cases += [Case("select_pairs.py", "no --fr", ["--data", "{toy}", "--out", "{ws}/p.csv"], needle="--fr"),
              Case("select_pairs.py", "no --generator", ["--space", "condition", "--out", "{ws}/p.csv"],
                   needle="--generator")]
    return cases


def out_cases(stage, base, out, is_dir, xfail=""):
    """Outputs that cannot be written; `base` already names `out` as --out. The case folder holds an
    earlier output in every case, which must stay as it was."""
    swap = lambda new: [new if a == out else a for a in base]  # noqa: E731
    what = "folder" if is_dir else "file"
    return [Case(stage, f"--out is a {'file' if is_dir else 'folder'}", swap("{ws}/taken"), needle="--out",
                 setup="taken_file" if is_dir else "taken_folder", xfail=xfail),
            Case(stage, f"--out {what} under a file", swap("{ws}/earlier.txt/sub"), needle="--out", xfail=xfail),
            Case(stage, "--out in use", base, needle="in use", setup="locked" + ("_dir" if is_dir else ""),
                 xfail=xfail)]


def scoremix_cases(rng):
    stage = "scoremix_sample.py"
    base = ["--net", "{snap}", "--pairs", "{pairs}", "--per-pair", 2, "--steps", 2, "--out", "{ws}/out"]
    cases = flag_cases(stage, base, {
        "--per-pair": "positive_int", "--steps": "positive_int", "--batch-size": "positive_int",
        "--seed": "non_negative_int", "--alpha": "probability", "--churn": "non_negative_float",
        "--churn-min": "non_negative_float", "--churn-max": "non_negative_float",
        "--churn-noise": "positive_float", "--guidance": "finite_float", "--weights": "non_negative_float",
        "--grid-seeds": "positive_int"}, rng)
    for k in SNAP_KINDS:
        cases.append(Case(stage, f"--net {k}", ["--net", "{bad}/" + k, *base[2:]], needle=k))
        cases.append(Case(stage, f"--guide {k}", ["--guide", "{bad}/" + k, *base], needle=k))
    for name, _, needle in PAIRS:
        cases.append(Case(stage, f"pairs {name}", [*base[:2], "--pairs", "{bad}/" + name, *base[4:]],
                          needle=needle))
    cases.append(Case(stage, "pairs missing", [*base[:2], "--pairs", "{bad}/none.csv", *base[4:]],
                      needle="not found"))
    cases += [Case(stage, f"--weights {w}", [*base, "--weights", *w], needle="weight") for w in
              ([0.7, 0.7], [1.0], [0.2, 0.3, 0.5], [round(rng.random(), 3), 1.0])]
    cases += out_cases(stage, base, "{ws}/out", is_dir=True)
    cases.append(Case(stage, "an unfinished identity folder", base, needle="not a complete identity folder",
                      setup="foreign_identity"))
    cases += [Case(stage, "--grid without --classes", ["--net", "{snap}", "--grid", "{ws}/g.png"],
                   needle="--classes"),
              Case(stage, "--grid unknown class", ["--net", "{snap}", "--grid", "{ws}/g.png", "--classes",
                                                   "id00000", "x" + str(rng.randint(0, 999))], needle="unknown"),
              Case(stage, "--grid is a folder", ["--net", "{snap}", "--grid", "{ws}/taken", "--classes", "id00000",
                                                 "id00001"], needle="--grid", setup="taken_folder"),
              Case(stage, "condmix without --pairs", ["--net", "{snap}", "--mode", "condmix", "--out", "{ws}/out"],
                   needle="--pairs"),
              Case(stage, "CFG without a null class", ["--net", "{bad}/no_null.pt", "--pairs", "{pairs}",
                                                       "--guidance", 2, "--out", "{ws}/out"], needle="null class"),
              Case(stage, "a guide of another resolution", ["--guide", "{bad}/small.pt", *base], needle="8 px")]
    return cases


def cka_cases(rng):
    stage = "cka.py"
    base = ["--fr", "{fr}", "--data", "{toy}", "--out", "{ws}/cka.json"]
    cases = flag_cases(stage, base, {"--k": "positive_int", "--permutations": "positive_int",
                                     "--batch-size": "positive_int", "--seed": "non_negative_int"}, rng)
    cases += [Case(stage, f"--fr {k}", ["--fr", "{bad}/" + k, *base[2:]], needle=k) for k in FR_KINDS]
    cases += [Case(stage, f"--generator {k}", [*base, "--generator", "{bad}/" + k], needle=k) for k in SNAP_KINDS]
    cases += [Case(stage, f"--data {d}", ["--fr", "{fr}", "--data", "{bad}/" + d, "--out", "{ws}/cka.json"],
                   needle=d) for d in BAD_DATA if d != "data_corrupt"]
    cases.append(Case(stage, "--data with a corrupt image", ["--fr", "{fr}", "--data", "{bad}/data_corrupt",
                                                            "--out", "{ws}/cka.json"], needle="corrupt image"))
    cases += out_cases(stage, base, "{ws}/cka.json", is_dir=False)
    return cases

# the other stages: what they refuse today runs; what they do not is an expected failure


def toy_faces_cases(rng):
    stage = "toy_faces.py"
    base = ["--out", "{ws}/toy", "--identities", 2, "--per-identity", 1, "--test-identities", 2, "--pairs", 2,
            "--heldout", 0]
    cases = flag_cases(stage, base, {"--identities": "positive_int", "--per-identity": "positive_int",
                                     "--test-identities": "positive_int", "--pairs": "positive_int",
                                     "--resolution": "positive_int", "--seed": "non_negative_int",
                                     "--heldout": "non_negative_int", "--nuisance": "non_negative_float"},
                       rng, unchecked={"--seed", "--heldout", "--nuisance"})
    outs = out_cases(stage, base, "{ws}/toy", is_dir=True, xfail="toy_faces.py does not check --out yet")
    for c in outs:
        c.slow = c.setup.startswith("locked")  # it takes no lock yet: it would write the data set
    return cases + outs


def training_cases(stage, base, flags, unchecked, rng):
    """A trainer: bad numbers, damaged data, outputs it cannot write (it checks none of them first yet)."""
    cases = flag_cases(stage, base, flags, rng, unchecked=unchecked)
    for d in BAD_DATA:
        cases.append(Case(stage, f"--data {d}", ["--data", "{bad}/" + d, *base[2:]],
                          needle="corrupt image" if d == "data_corrupt" else d))
    outs = out_cases(stage, base, "{ws}/run", is_dir=True, xfail=f"{stage} does not check --out before training yet")
    for c in outs:
        c.slow = True
    return cases + outs


def train_arcface_cases(rng):
    base = ["--data", "{toy}", "--out", "{ws}/run", "--steps", 1, "--width", 0.125, "--embedding-size", 8,
            "--batch-size", 4, "--workers", 0]
    flags = {"--batch-size": "positive_int", "--epochs": "positive_int", "--lr": "positive_float",
             "--workers": "non_negative_int", "--embedding-size": "positive_int", "--width": "positive_float"}
    cases = training_cases("train_arcface.py", base, flags, set(flags), rng)
    for c in cases:
        if c.name == "--data data_corrupt":
            c.xfail = "train_arcface.py writes config.json before reading the data"
    return cases


def train_diffusion_cases(rng):
    base = ["--data", "{toy}", "--out", "{ws}/run", "--resolution", 16, "--channels", 8, "--channel-mult", 1, 2,
            "--batch-size", 4, "--duration", 0.004, "--snapshot-every", 0]
    flags = {"--batch-size": "positive_int", "--duration": "positive_float", "--lr": "positive_float",
             "--label-dropout": "probability", "--channels": "positive_int", "--grad-accum": "positive_int"}
    return training_cases("train_diffusion.py", base, flags, set(flags) - {"--label-dropout"}, rng)


def evaluate_cases(rng):
    stage = "evaluate.py"
    base = ["--model", "{fr}", "--bin", "{toy}/../bench/toy_lfw.bin", "--out", "{ws}/results.json"]
    cases = flag_cases(stage, base, {"--batch-size": "positive_int"}, rng, unchecked={"--batch-size"}, run=True)
    cases += [Case(stage, f"--model {k}", ["--model", "{bad}/" + k, *base[2:]], needle=k) for k in FR_KINDS]
    for c in cases[-len(FR_KINDS):]:
        if any(s in c.argv[1] for s in ("nan", "inf")):
            c.xfail, c.slow = "evaluate.py does not refuse non-finite weights yet", True
        elif not any(s in c.argv[1] for s in ("missing", "folder")):
            c.xfail = "evaluate.py does not name the file of every foreign checkpoint in one line yet"
    cases += [Case(stage, f"--bin {k}", ["--model", "{fr}", "--bin", "{bad}/" + k, *base[4:]], needle=k)
              for k in ("empty.pt", "noise0.pt", "text.pt", "evil.pt", "missing.pt")]
    cases += out_cases(stage, base, "{ws}/results.json", is_dir=False,
                       xfail="evaluate.py does not check --out before evaluating yet")
    return cases


BAD_DATA = ["data_empty", "data_file", "data_corrupt", "data_no_images", "data_missing"]
PAIRS = pairs_files(random.Random(2), 22)


def all_cases():
    rng = random.Random(0)
    cases = []
    for make in (select_pairs_cases, scoremix_cases, cka_cases, toy_faces_cases, train_arcface_cases,
                 train_diffusion_cases, evaluate_cases):
        stage_cases = make(rng)
        for i, c in enumerate(stage_cases):
            c.subprocess = i % SUBPROCESS_EVERY == SUBPROCESS_EVERY // 2 and not c.xfail
        cases += stage_cases
    return cases


CASES = all_cases()

# ----------------------------------------------------------------------------- running a case


@pytest.fixture(scope="session")
def world(tiny_toy, tiny_models, tmp_path_factory):
    """The shared inputs of every case: the toy set, the tiny models and the damaged files."""
    fr, snap = tiny_models
    bad = tmp_path_factory.mktemp("fuzz_inputs")
    marker = make_bad_files(bad, fr, snap)
    make_bad_data(bad, tiny_toy / "train")
    for name, data, _ in PAIRS:
        (bad / name).write_bytes(data)
    snapshot = torch.load(snap, weights_only=True)
    from train_diffusion import Denoiser
    small = Denoiser(**{**snapshot["config"], "img_resolution": 8})
    torch.save({**snapshot, "config": small.config, "ema": small.state_dict()}, bad / "small.pt")
    no_null = Denoiser(**{**snapshot["config"], "null_class": False})
    torch.save({**snapshot, "config": no_null.config, "ema": no_null.state_dict()}, bad / "no_null.pt")
    pairs = bad / "good_pairs.csv"
    pairs.write_text("class_a,class_b,distance,rank\nid00000,id00003,1,1\nid00001,id00004,1,2\n")
    return {"toy": str(tiny_toy / "train"), "fr": str(fr), "snap": str(snap), "bad": str(bad),
            "pairs": str(pairs), "marker": marker}


def fill(value, places):
    return str(value).format(**places) if isinstance(value, str) else str(value)


def prepare(case, ws):
    """The case folder: an earlier output that must survive, and the case's own set-up."""
    (ws / "earlier.txt").write_text("an earlier result")
    stack = contextlib.ExitStack()
    if case.setup == "taken_file":
        (ws / "taken").write_text("a file where a folder is meant")
    elif case.setup == "taken_folder":
        (ws / "taken").mkdir()
        (ws / "taken" / "keep.txt").write_text("keep")
    elif case.setup.startswith("locked"):
        target = next(a for i, a in enumerate(case.argv) if i and case.argv[i - 1] == "--out")
        target = fill(target, {"ws": ws})
        if case.setup == "locked_dir":
            os.makedirs(target)
            open(os.path.join(target, "previous.txt"), "w").write("previous")
        stack.enter_context(output_lock(target, is_dir=case.setup == "locked_dir"))
    elif case.setup == "foreign_identity":
        os.makedirs(ws / "out" / "mix_id00000_id00003")
        (ws / "out" / "mix_id00000_id00003" / "0.png").write_bytes(b"not ours")
    return stack


def tree(folder):
    """{relative path: content hash} of everything under folder (hidden files too), lock files aside."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if name.endswith(".lock"):
                continue
            out[rel] = hashlib.sha1(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "dir"
    return out


def run_in_process(stage, argv):
    """main(argv) of the stage in this process -> (exit status, stderr text including the exit message)."""
    module = __import__(stage[:-3])
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if stage == "toy_faces.py":  # its main() reads sys.argv
                saved, sys.argv = sys.argv, [stage, *argv]
                try:
                    module.main()
                finally:
                    sys.argv = saved
            else:
                module.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:  # an escaped exception is what a user would see as a traceback
            import traceback
            code = 1
            print(traceback.format_exc(), file=sys.stderr)
    return code, err.getvalue()


def verdict(stage, code, stderr, needle):
    """-> a list of what is wrong with the outcome (empty: one clear line)."""
    problems = []
    if code == 0:
        problems.append("exit status 0")
    if "Traceback" in stderr:
        problems.append("a traceback")
    lines = [s for s in stderr.splitlines() if ERROR_LINE.match(s)]
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    elif needle and needle not in lines[0]:
        problems.append(f"the error line does not name {needle!r}: {lines[0]}")
    if stage in MINE and len([s for s in stderr.splitlines() if s.strip()]) != 1:
        problems.append("more than the one line on stderr")
    return problems


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.stage}:{c.name}", marks=[
    *([pytest.mark.xfail(reason=c.xfail, run=not c.slow, strict=False)] if c.xfail else [])]) for c in CASES])
def test_bad_input_is_refused_at_the_door(case, world, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    places = {**world, "ws": str(ws)}
    argv = [fill(a, places) for a in case.argv]
    with prepare(case, ws):
        before = tree(ws)
        code, stderr = run_in_process(case.stage, argv)
        after = tree(ws)
    problems = verdict(case.stage, code, stderr, fill(case.needle, places))
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        problems.append(f"the case folder changed: {changed[:3]}")
    if os.path.exists(world["marker"]):
        problems.append("a pickle ran code")
    if case.subprocess and not problems:
        r = run_script(case.stage, *argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        problems += [f"subprocess: {p}" for p in verdict(case.stage, r.returncode, r.stderr, fill(case.needle, places))]
        if tree(ws) != before:
            problems.append("subprocess: the case folder changed")
    assert not problems, f"{' '.join(argv)}\n{stderr[-2000:]}\n{problems}"


def test_generated_case_counts():
    """The families are generated, not listed: every stage gets dozens of cases, the same each run."""
    counts = {}
    for c in CASES:
        counts[c.stage] = counts.get(c.stage, 0) + 1
    assert all(counts[s] >= 40 for s in MINE), counts
    assert [c.argv for c in all_cases()] == [c.argv for c in CASES]  # seeded: the same families every run
    print("fuzz cases per stage:", counts, "expected failures:",
          {s: sum(1 for c in CASES if c.stage == s and c.xfail) for s in counts})
