"""Generated families of bad input for every command line: each must be refused at the door.

For every case the stage must exit non-zero with exactly one line starting with `error:`
(argparse's own `<script>.py: error:` counts for the scripts that still use it) naming the
problem, print no traceback, write nothing and leave nothing behind in the case's folder, and
leave the earlier output there unchanged. Cases come from a seeded random source, so the same
families come back on every run: bad numbers for every numeric flag (zero, negative, fractional,
non-finite, not a number), damaged and foreign files for every checkpoint argument (empty, random
bytes, truncated, another kind of checkpoint, a code-running pickle, a weight set to NaN or
infinity), damaged data folders, damaged pairs.csv files, and outputs that cannot be written (a
file, a folder, a path under a file, an output another process is writing). Cases run in this
process through `main(argv)`; a sample also runs as a real subprocess.
"""
import contextlib
import hashlib
import io
import os
import pickle
import random
import re
import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass

import pytest
import torch

from common import output_lock
from conftest import poisoned_copy, run_script

ERROR_LINE = re.compile(r"^(?:[\w.-]+\.py: )?error: ")
MINE = ("select_pairs.py", "scoremix_sample.py", "cka.py")  # stages that print only the one line
SUBPROCESS_EVERY = 25  # one case in 25 also runs as a subprocess
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class Case:
    stage: str
    name: str
    argv: list  # {ws}, {toy}, {fr}, {snap}, {bad}, {pairs} are filled in per case
    needle: str = ""  # what the error line must name (filled in like argv)
    setup: str = ""  # how prepare() readies the case folder
    subprocess: bool = False


def with_flag(argv, flag, value):
    """argv with `flag`'s value replaced (or the flag and value appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]

# ----------------------------------------------------------------------------- value families


def bad_numbers(kind, rng, n=4):
    """n distinct bad spellings for a flag of this kind."""
    word = rng.choice(["", "abc", "1e", "--", "0x1g", "½", "1,5", " "])
    big = rng.randint(1, 10 ** 6)
    pool = {
        "positive_int": ["0", str(-big), f"{rng.random() + 0.5:.3f}", "nan", word, "-0"],
        "non_negative_int": [str(-big), f"{rng.random() + 0.1:.2f}", "inf", word, "-1"],
        "positive_float": ["0", f"{-rng.random() * 10 ** rng.randint(0, 9):.4g}", "nan", "inf",
                           "-inf", word],
        "non_negative_float": [f"{-rng.random() * 10 ** rng.randint(-3, 9):.4g}", "nan", "-inf",
                               "inf", word],
        "probability": [f"{1 + rng.random() * 10 ** rng.randint(-4, 3):.6g}",
                        f"{-rng.random():.4g}", "nan", "inf", word],
        "finite_float": ["nan", "inf", "-inf", word]}[kind]
    rng.shuffle(pool)
    return list(dict.fromkeys(pool))[:n]


BAD_FILES = {  # every checkpoint argument gets each of these (made by make_bad_files)
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
    "nan_snap.pt": "a snapshot with a NaN weight", "inf_snap.pt": "a snapshot with an inf weight",
    "nan_label_snap.pt": "a snapshot whose class embedding holds NaN",
}
FR_KINDS = [f for f in BAD_FILES if "snap" not in f] + ["truncated_snap.pt", "nan_snap.pt"]
SNAP_KINDS = [f for f in BAD_FILES if "_fr" not in f] + ["nan_fr.pt"]
BAD_DATA = ["data_empty", "data_file", "data_corrupt", "data_no_images", "data_missing"]


def make_bad_files(folder, fr, snap):
    """BAD_FILES in `folder` -> the file the code-running pickle would create."""
    rng = random.Random(1)
    os.makedirs(folder / "folder.pt")
    (folder / "empty.pt").write_bytes(b"")
    for i in range(2):
        size = rng.randint(1, 4096)
        (folder / f"noise{i}.pt").write_bytes(bytes(rng.randrange(256) for _ in range(size)))
    (folder / "text.pt").write_text("class_a,class_b\nid0,id1\n")
    for src, name in ((fr, "truncated_fr.pt"), (snap, "truncated_snap.pt")):
        data = open(src, "rb").read()
        (folder / name).write_bytes(data[:rng.randint(10, len(data) - 10)])
    marker = folder / "evil-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    evil = {"config": Evil(), "state_dict": {}, "ema": Evil()}
    (folder / "evil.pt").write_bytes(pickle.dumps(evil))
    torch.save({"config": {"depth": 18}, "weights": [1, 2]}, folder / "dict.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    poisoned_copy(fr, folder / "nan_fr.pt")
    poisoned_copy(fr, folder / "inf_fr.pt", value=float("inf"))
    poisoned_copy(snap, folder / "nan_snap.pt", "unet.conv_in.weight")
    poisoned_copy(snap, folder / "inf_snap.pt", "unet.out_conv.bias", float("-inf"))
    poisoned_copy(snap, folder / "nan_label_snap.pt", "unet.emb_label.weight")
    return marker


def make_bad_data(folder, toy_train):
    """BAD_DATA in `folder` (data_missing stays missing)."""
    (folder / "data_empty").mkdir()
    (folder / "data_file").write_text("not a folder")
    shutil.copytree(toy_train, folder / "data_corrupt")
    first = sorted(os.listdir(folder / "data_corrupt"))[0]
    image = sorted(os.listdir(folder / "data_corrupt" / first))[0]
    (folder / "data_corrupt" / first / image).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "data_no_images" / "id0").mkdir(parents=True)
    (folder / "data_no_images" / "id0" / "notes.txt").write_text("no images")


def make_guides(folder, snap):
    """A generator of another resolution and one without a null class, with the same classes."""
    from train_diffusion import Denoiser
    snapshot = torch.load(snap, weights_only=True)
    for name, change in (("small.pt", {"img_resolution": 8}),
                         ("no_null.pt", {"null_class": False})):
        net = Denoiser(**{**snapshot["config"], **change})
        torch.save({**snapshot, "config": net.config, "ema": net.state_dict()}, folder / name)


def pairs_files(rng, n):
    """n generated damaged pairs.csv files -> [(name, bytes, needle)] (classes id00000..id00005)."""
    known = [f"id{i:05d}" for i in range(6)]

    def word():
        letters = "abcdefghijklmnopqrstuvwxyz_0123456789"
        return "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))

    def csv_bytes(rows, encoding="utf-8"):
        return "".join(",".join(r) + "\n" for r in rows).encode(encoding)

    header = ["class_a", "class_b"]
    makers = [
        lambda: (csv_bytes([header, [rng.choice(known), "x" + word()]]), "unknown class"),
        lambda: (csv_bytes([["class_a", "class_b", "class_c"],
                            [known[1]] * 2 + [rng.choice(known)]]),
                 "appears twice"),
        lambda: (csv_bytes([[rng.choice(["class_x", "a", "Class_A", "class a"]), "class_b"],
                            known[:2]]), "no column 'class_a'"),
        lambda: (csv_bytes([["class_a", rng.choice(["", "classb", "b"])], known[:2]]),
                 "no column 'class_b'"),
        lambda: (csv_bytes([header]), "no pairs"),
        lambda: (b"", "no column"),
        lambda: (csv_bytes([header, known[:2], known[:rng.choice([1, 3])]]), "fields"),
        lambda: (csv_bytes([header, [known[0], ""]]), "empty class_b"),
        lambda: (bytes(rng.randrange(128, 256) for _ in range(rng.randint(2, 300))), "UTF-8"),
        lambda: (csv_bytes([header, known[:2]], "utf-16"), "UTF-8"),
        lambda: (csv_bytes([header, [known[0], "\x00" + known[1]]]), "line 2"),
    ]
    return [(f"pairs{i}.csv", *makers[i % len(makers)]()) for i in range(n)]


PAIRS = pairs_files(random.Random(2), 22)

# ----------------------------------------------------------------------------- the cases


def flag_cases(stage, base, flags, rng):
    """Every numeric flag of a stage with a few generated bad values."""
    return [Case(stage, f"{flag}={value!r}", with_flag(base, flag, value), needle=flag)
            for flag, kind in flags.items() for value in bad_numbers(kind, rng)]


def file_cases(stage, base, flag, kinds):
    """`flag` given each damaged file in turn."""
    return [Case(stage, f"{flag} {k}", with_flag(base, flag, "{bad}/" + k),
                 needle=k) for k in kinds]


def data_cases(stage, base):
    return [Case(stage, f"--data {d}", with_flag(base, "--data", "{bad}/" + d),
                 needle="corrupt image" if d == "data_corrupt" else d) for d in BAD_DATA]


def out_cases(stage, base, is_dir):
    """Outputs that cannot be written. Every case folder also holds an earlier output that must
    stay as it was."""
    taken = "a file" if is_dir else "a folder"
    cases = [Case(stage, f"--out is {taken}", with_flag(base, "--out", "{ws}/taken"),
                  needle="--out", setup="taken_file" if is_dir else "taken_folder"),
             Case(stage, "--out under a file", with_flag(base, "--out", "{ws}/earlier.txt/sub"),
                  needle="--out"),
             Case(stage, "--out in use", base, needle="in use",
                  setup="locked_dir" if is_dir else "locked_file")]
    return cases


def select_pairs_cases(rng):
    stage = "select_pairs.py"
    base = ["--fr", "{fr}", "--data", "{toy}", "--out", "{ws}/pairs.csv"]
    cond = ["--space", "condition", "--generator", "{snap}", "--out", "{ws}/pairs.csv"]
    cases = flag_cases(stage, base, {
        "--num-pairs": "positive_int", "--max-uses": "positive_int", "--batch-size": "positive_int",
        "--workers": "non_negative_int", "--seed": "non_negative_int",
        "--max-matrix-gb": "non_negative_float", "--tuple-size": "positive_int"}, rng)
    cases += file_cases(stage, base, "--fr", FR_KINDS)
    cases += file_cases(stage, cond, "--generator", SNAP_KINDS)
    cases += data_cases(stage, base)
    for n in rng.sample(range(16, 10 ** 6), 3):  # more tuples than 6 classes hold
        cases.append(
            Case(stage, f"--num-pairs {n}", [*cond, "--num-pairs", n], needle="at most 15"))
        cases.append(Case(stage, f"{n + 5} triplets",
                          [*cond, "--tuple-size", 3, "--num-pairs", n + 5], needle="at most 20"))
    cases += out_cases(stage, cond, is_dir=False)
    cases += [Case(stage, "no --fr", ["--data", "{toy}", "--out", "{ws}/p.csv"], needle="--fr"),
              Case(stage, "no --generator", ["--space", "condition", "--out", "{ws}/p.csv"],
                   needle="--generator")]
    return cases


def scoremix_cases(rng):
    stage = "scoremix_sample.py"
    base = ["--net", "{snap}", "--pairs", "{pairs}", "--per-pair", 2, "--steps", 2, "--out",
            "{ws}/out"]
    cases = flag_cases(stage, base, {
        "--per-pair": "positive_int", "--steps": "positive_int", "--batch-size": "positive_int",
        "--seed": "non_negative_int", "--alpha": "probability", "--churn": "non_negative_float",
        "--churn-min": "non_negative_float", "--churn-max": "non_negative_float",
        "--churn-noise": "positive_float", "--guidance": "finite_float",
        "--weights": "non_negative_float", "--grid-seeds": "positive_int"}, rng)
    cases += file_cases(stage, base, "--net", SNAP_KINDS)
    cases += file_cases(stage, ["--guide", "{snap}", *base], "--guide", SNAP_KINDS)
    cases += [Case(stage, f"pairs {name}", with_flag(base, "--pairs", "{bad}/" + name),
                   needle=needle)
              for name, _, needle in PAIRS]
    cases.append(Case(stage, "pairs missing", with_flag(base, "--pairs", "{bad}/none.csv"),
                      needle="not found"))
    for w in ([0.7, 0.7], [1.0], [0.2, 0.3, 0.5], [round(rng.random(), 3), 1.0]):
        cases.append(Case(stage, f"--weights {w}", [*base, "--weights", *w], needle="weight"))
    cases += out_cases(stage, base, is_dir=True)
    cases.append(Case(stage, "an unfinished identity folder", base, setup="foreign_identity",
                      needle="not a complete identity folder"))
    grid = ["--net", "{snap}", "--grid", "{ws}/g.png", "--classes", "id00000"]
    cases += [
        Case(stage, "--grid without --classes", grid[:4], needle="--classes"),
        Case(stage, "--grid unknown class", [*grid, f"x{rng.randint(0, 999)}"], needle="unknown"),
        Case(stage, "--grid is a folder", with_flag([*grid, "id00001"], "--grid", "{ws}/taken"),
             needle="--grid", setup="taken_folder"),
        Case(stage, "condmix without --pairs", ["--net", "{snap}", "--mode", "condmix", "--out",
                                                "{ws}/out"], needle="--pairs"),
        Case(stage, "CFG without a null class", [*with_flag(base, "--net", "{bad}/no_null.pt"),
                                                 "--guidance", 2], needle="null class"),
        Case(stage, "a guide of another resolution", ["--guide", "{bad}/small.pt", *base],
             needle="8 px")]
    return cases


def cka_cases(rng):
    stage = "cka.py"
    base = ["--fr", "{fr}", "--data", "{toy}", "--out", "{ws}/cka.json"]
    cases = flag_cases(stage, base, {"--k": "positive_int", "--permutations": "positive_int",
                                     "--batch-size": "positive_int",
                                     "--seed": "non_negative_int"}, rng)
    cases += file_cases(stage, base, "--fr", FR_KINDS)
    cases += file_cases(stage, base, "--generator", SNAP_KINDS)
    cases += data_cases(stage, base)
    return cases + out_cases(stage, base, is_dir=False)

# the other stages: what they refuse today runs; what they do not is an expected failure


def toy_faces_cases(rng):
    stage = "toy_faces.py"
    base = ["--out", "{ws}/toy", "--identities", 2, "--per-identity", 1, "--test-identities", 2,
            "--pairs", 2, "--heldout", 0]
    cases = flag_cases(stage, base, {
        "--identities": "positive_int", "--per-identity": "positive_int",
        "--test-identities": "positive_int", "--pairs": "positive_int",
        "--resolution": "positive_int", "--seed": "non_negative_int",
        "--heldout": "non_negative_int", "--nuisance": "non_negative_float",
        "--lookalike-keep": "probability", "--val-identities": "non_negative_int"}, rng)
    return cases + out_cases(stage, base, is_dir=True)


def training_cases(stage, base, flags, rng):
    """A trainer: bad numbers, damaged data, outputs it cannot write."""
    return (flag_cases(stage, base, flags, rng) + data_cases(stage, base)
            + out_cases(stage, base, is_dir=True))


def train_arcface_cases(rng):
    base = ["--data", "{toy}", "--out", "{ws}/run", "--steps", 1, "--width", 0.125,
            "--embedding-size", 8, "--batch-size", 4, "--workers", 0]
    flags = {"--batch-size": "positive_int", "--epochs": "positive_int", "--lr": "positive_float",
             "--workers": "non_negative_int", "--embedding-size": "positive_int",
             "--width": "positive_float", "--dropout": "probability", "--seed": "non_negative_int",
             "--pack-quality": "positive_int"}
    return training_cases("train_arcface.py", base, flags, rng)


def train_diffusion_cases(rng):
    base = ["--data", "{toy}", "--out", "{ws}/run", "--resolution", 16, "--channels", 8,
            "--channel-mult", 1, 2, "--batch-size", 4, "--duration", 0.004, "--snapshot-every", 0]
    flags = {"--batch-size": "positive_int", "--duration": "positive_float",
             "--lr": "positive_float", "--label-dropout": "probability",
             "--channels": "positive_int", "--grad-accum": "positive_int",
             "--workers": "non_negative_int", "--seed": "non_negative_int",
             "--ema-std": "positive_float", "--grid-steps": "non_negative_int"}
    return training_cases("train_diffusion.py", base, flags, rng)


def evaluate_cases(rng):
    stage = "evaluate.py"
    base = ["--model", "{fr}", "--bin", "{toy}/../bench/toy_lfw.bin", "--out", "{ws}/results.json"]
    cases = flag_cases(stage, base,
                       {"--batch-size": "positive_int", "--input-size": "positive_int"}, rng)
    cases += file_cases(stage, base, "--model", FR_KINDS)
    cases += file_cases(stage, base, "--bin", ["empty.pt", "noise0.pt", "text.pt", "evil.pt",
                                               "missing.pt"])
    return cases + out_cases(stage, base, is_dir=False)


def all_cases():
    rng = random.Random(0)
    cases = []
    for make in (select_pairs_cases, scoremix_cases, cka_cases, toy_faces_cases,
                 train_arcface_cases, train_diffusion_cases, evaluate_cases):
        stage_cases = make(rng)
        for i, case in enumerate(stage_cases):
            case.subprocess = i % SUBPROCESS_EVERY == SUBPROCESS_EVERY // 2
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
    make_guides(bad, snap)
    for name, data, _ in PAIRS:
        (bad / name).write_bytes(data)
    pairs = bad / "good_pairs.csv"
    pairs.write_text("class_a,class_b,distance,rank\nid00000,id00003,1,1\nid00001,id00004,1,2\n")
    return {"toy": str(tiny_toy / "train"), "fr": str(fr), "snap": str(snap), "bad": str(bad),
            "pairs": str(pairs), "marker": marker}


def fill(value, places):
    return str(value).format(**places) if isinstance(value, str) else str(value)


def prepare(case, ws):
    """The case folder: an earlier output that must survive, and the case's own set-up
    -> a context holding the output's lock where the case needs another writer."""
    (ws / "earlier.txt").write_text("an earlier result")
    if case.setup == "taken_file":
        (ws / "taken").write_text("a file where a folder is meant")
    elif case.setup == "taken_folder":
        (ws / "taken").mkdir()
        (ws / "taken" / "keep.txt").write_text("keep")
    elif case.setup == "foreign_identity":
        (ws / "out" / "mix_id00000_id00003").mkdir(parents=True)
        (ws / "out" / "mix_id00000_id00003" / "0.png").write_bytes(b"not ours")
    elif case.setup.startswith("locked"):
        out = fill(case.argv[case.argv.index("--out") + 1], {"ws": ws})
        if case.setup == "locked_dir":
            os.makedirs(out)
            open(os.path.join(out, "previous.txt"), "w").write("previous")
        return output_lock(out, is_dir=case.setup == "locked_dir")
    return contextlib.nullcontext()


def tree(folder):
    """{relative path: content hash} of everything under folder (hidden too), lock files aside."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not name.endswith(".lock"):
                out[os.path.relpath(path, folder)] = (
                    hashlib.sha1(open(path, "rb").read()).hexdigest() if os.path.isfile(path)
                    else "dir")
    return out


def run_in_process(stage, argv):
    """main(argv) of the stage in this process -> (exit status, stderr with the exit message)."""
    module = __import__(stage[:-3])
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # as a user's shell shows them (pytest would hide them)
        try:
            module.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:  # an escaped exception is what a user would see as a traceback
            code = 1
            print(traceback.format_exc(), file=sys.stderr)
    return code, "".join(f"warning: {w.message}\n" for w in caught) + err.getvalue()


def verdict(stage, code, stderr, needle):
    """-> what is wrong with an outcome (nothing: one clear line)."""
    problems = []
    if code == 0:
        problems.append("exit status 0")
    if "Traceback" in stderr:
        problems.append("a traceback")
    if "warning: " in stderr:
        problems.append("a warning before the error line")
    lines = [s for s in stderr.splitlines() if ERROR_LINE.match(s)]
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    elif needle and needle not in lines[0]:
        problems.append(f"the error line does not name {needle!r}: {lines[0]}")
    if stage in MINE and len([s for s in stderr.splitlines() if s.strip()]) != 1:
        problems.append("more than the one line on stderr")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[f"{c.stage}:{c.name}" for c in CASES])
def test_bad_input_is_refused_at_the_door(case, world, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    places = {**world, "ws": str(ws)}
    argv, needle = [fill(a, places) for a in case.argv], fill(case.needle, places)
    with prepare(case, ws):
        before = tree(ws)
        code, stderr = run_in_process(case.stage, argv)
        problems = verdict(case.stage, code, stderr, needle)
        changed = sorted(set(tree(ws).items()) ^ set(before.items()))
        if changed:
            problems.append(f"the case folder changed: {changed[:3]}")
        if case.subprocess and not problems:
            r = run_script(case.stage, *argv, env=ENV, timeout=120)
            problems += [f"subprocess: {p}" for p in verdict(case.stage, r.returncode, r.stderr,
                                                             needle)]
            if tree(ws) != before:
                problems.append("subprocess: the case folder changed")
    if os.path.exists(world["marker"]):
        problems.append("a pickle ran code")
    assert not problems, f"{' '.join(argv)}\n{stderr[-2000:]}\n{problems}"


def test_the_families_are_generated_and_the_same_every_run():
    counts = {}
    for case in CASES:
        counts[case.stage] = counts.get(case.stage, 0) + 1
    assert all(counts[s] >= 40 for s in MINE), counts
    assert [c.argv for c in all_cases()] == [c.argv for c in CASES]  # seeded
    assert sum(c.subprocess for c in CASES) >= len(counts)
