"""``sdjax sample``: prompts files read into rows (bad rows named by line), the plan's seeds and fixed batches,
the split over processes, and resuming: a run of one or two processes killed with SIGKILL and started again
ends byte for byte as an uninterrupted run, on the built-in model at 64x64."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax import batch, cli
from sdjax.batch_output import MANIFEST_FILE, RUN_FILE
from sdjax.infotext import parse_infotext, read_png_infotext

SAMPLE = ["--steps", "2", "--size", "64x64"]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _defaults(**changes):
    values = dict(per_prompt=3, batch_size=4, steps=2, guidance=1.5, width=64, height=64, seed=100)
    return batch.Defaults(**{**values, **changes})


def test_the_three_prompt_file_formats(tmp_path):
    txt = _write(tmp_path / "p.txt", "a red circle\n\n# a comment\n  a blue square  \n")
    assert [(r.prompt, r.line) for r in batch.read_prompts(txt)] == [("a red circle", 1), ("a blue square", 4)]
    jsonl = _write(tmp_path / "p.jsonl", '{"prompt": "a", "seed": 7, "guidance_scale": 3}\n\n'
                                         '{"prompt": "b", "negative_prompt": "blurry", "width": 32, "steps": 3}\n')
    assert batch.read_prompts(jsonl) == (
        batch.PromptRow("a", 1, seed=7, guidance=3.0),
        batch.PromptRow("b", 3, negative_prompt="blurry", width=32, steps=3),
    )
    csv = _write(tmp_path / "p.csv", 'prompt,seed,guidance,height\n"a, with comma",5,,\nb,,2.5,48\n')
    assert batch.read_prompts(csv) == (batch.PromptRow("a, with comma", 2, seed=5),
                                       batch.PromptRow("b", 3, guidance=2.5, height=48))


@pytest.mark.parametrize("name, text, match", [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "seed": -1}\n', r"p.jsonl line 2: seed must be an integer"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', r"p.jsonl line 3: not JSON"),
    ("p.jsonl", '{"text": "a"}\n', r"line 1: unknown field 'text'; accepted: prompt, negative_prompt"),
    ("p.jsonl", '{"prompt": ""}\n', r"line 1: 'prompt' must be a non-empty string"),
    ("p.jsonl", '{"prompt": "a", "guidance": 2, "guidance_scale": 3}\n', r"line 1: give guidance or guidance_scale"),
    ("p.csv", "prompt,width\na,64\nb,60\n", r"p.csv line 3: width must be a positive multiple of 8, got 60"),
    ("p.csv", "prompt,steps\na,two\n", r"p.csv line 2: steps must be an integer in \[1, 1000\]"),
    ("p.csv", "text\na\n", r"p.csv line 1: the header row must name a 'prompt' column"),
    ("p.txt", "\n# only a comment\n", r"holds no prompts; expected one prompt per line"),
    ("p.yaml", "prompt: a\n", r"must be .txt, .jsonl, .csv, got '.yaml'"),
])
def test_a_bad_prompts_file_is_named_with_its_line(tmp_path, name, text, match):
    with pytest.raises(ValueError, match=match):
        batch.read_prompts(_write(tmp_path / name, text))


def test_seeds_and_batches_depend_only_on_the_plan():
    rows = (batch.PromptRow("a", 1), batch.PromptRow("b", 2, seed=7), batch.PromptRow("c", 3, width=32),
            batch.PromptRow("d", 4))
    plan = batch.make_plan(rows, _defaults())
    seeds = {(image.id.row, image.id.image): image.seed for image in plan.images}
    assert [seeds[(0, i)] for i in range(3)] == [100, 101, 102]
    assert [seeds[(1, i)] for i in range(3)] == [7, 8, 9]
    assert [seeds[(3, i)] for i in range(3)] == [109, 110, 111]  # base + row * per_prompt + image
    shapes = [{(image.width, image.steps) for image in b} for b in plan.batches]
    assert all(len(s) == 1 for s in shapes)  # one size and step count per batch
    assert [len(b) for b in plan.batches] == [4, 4, 1, 3]  # a, b, d at 64 px in fours; then c at 32 px
    with pytest.raises(ValueError, match="line 1: seeds 4294967295..4294967297"):
        batch.make_plan((batch.PromptRow("a", 1, seed=2**32 - 1),), _defaults())


@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_the_split_over_processes_is_disjoint_and_covering(batch_size):
    rows = tuple(batch.PromptRow(f"prompt {i}", i + 1) for i in range(37))
    plan = batch.make_plan(rows, _defaults(batch_size=batch_size))
    everything = sorted(image.id for image in plan.images)
    assert len(everything) == 37 * 3
    for count in range(1, 5):
        shares = [[image.id for b in batch.process_batches(plan, index, count) for image in b]
                  for index in range(count)]
        assert sorted(i for share in shares for i in share) == everything
        assert sum(len(share) for share in shares) == len(everything)  # no image twice
    with pytest.raises(ValueError, match="process_index must be an integer in \\[0, 1\\]"):
        batch.process_batches(plan, 2, 2)


def _manifest(folder):
    return (folder / MANIFEST_FILE).read_text(encoding="utf-8").splitlines()


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _command(prompts, out):
    return [sys.executable, "-m", "sdjax.cli", "sample", str(prompts), "--out", str(out), "--per-prompt", "2",
            "--batch-size", "2", *SAMPLE]


def _run_until(command, env, out, finished_images, log):
    """Run ``command``; SIGKILL it as soon as the manifest holds ``finished_images`` rows (None: to the end)."""
    with open(log, "ab") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
        while finished_images is not None and process.poll() is None:
            manifest = out / MANIFEST_FILE
            text = manifest.read_text(encoding="utf-8") if manifest.exists() else ""
            if text.count("\n") >= finished_images and (out / RUN_FILE).exists():
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        code = process.wait(timeout=600)
    assert code == (0 if finished_images is None else -signal.SIGKILL), log.read_text()[-3000:]


@pytest.mark.slow
def test_killed_runs_of_one_or_two_processes_resume_to_the_uninterrupted_result(tmp_path):
    prompts = _write(tmp_path / "prompts.txt", "".join(f"shape number {i}\n" for i in range(7)))
    env = {**os.environ, "SDJAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    whole, resumed, log = tmp_path / "whole", tmp_path / "resumed", tmp_path / "log.txt"
    _run_until(_command(prompts, whole), env, whole, None, log)
    expected = _files(whole)
    assert len(_manifest(whole)) == 14 and len(expected) == 14 + 2  # the images, the manifest and run.json

    for finished in (1, 5, 10):
        _run_until(_command(prompts, resumed), env, resumed, finished, log)
        assert finished <= len(_manifest(resumed)) < 14  # killed mid-run
    # a kill between an image's rename and its manifest row, and one during a write
    rows = _manifest(resumed)
    (resumed / MANIFEST_FILE).write_text("\n".join(rows[:-1]) + "\n" + rows[-1][:20], encoding="utf-8")
    (resumed / ".00006_1-x1y2.png.tmp").write_bytes(b"partial")
    _run_until(_command(prompts, resumed), env, resumed, None, log)
    assert _files(resumed) == expected  # same names, same bytes, same manifest; nothing left over

    # Two processes on localhost split the batches, are killed together, resume: still the same files.
    two = tmp_path / "two"
    env.pop("XLA_FLAGS", None)
    _run_processes(prompts, two, env, log, kill_after=3)
    assert 3 <= len(_manifest(two)) < 14
    _run_processes(prompts, two, env, log)
    assert _files(two) == expected


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(prompts, out, env, log, kill_after=None):
    """``sdjax sample`` as 2 processes on localhost; both SIGKILLed once process 0's manifest has ``kill_after``
    rows (None: to the end)."""
    coordinator = f"localhost:{_free_port()}"
    with open(log, "ab") as output:
        runs = [subprocess.Popen([*_command(prompts, out), "--coordinator", coordinator, "--num-processes", "2",
                                  "--process-id", str(i)], env=env, stdout=output, stderr=output) for i in range(2)]
        while kill_after is not None and all(run.poll() is None for run in runs):
            manifest = out / MANIFEST_FILE
            if manifest.exists() and manifest.read_text(encoding="utf-8").count("\n") >= kill_after:
                for run in runs:
                    run.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        codes = [run.wait(timeout=600) for run in runs]
    expected = 0 if kill_after is None else -signal.SIGKILL
    assert codes == [expected, expected], log.read_text()[-3000:]


def test_images_equal_the_api_alone_and_a_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "cache"))
    prompts = _write(tmp_path / "p.jsonl", '{"prompt": "a red circle"}\n'
                                           '{"prompt": "a blue square", "seed": 42, "guidance": 3, '
                                           '"negative_prompt": "green"}\n')
    out = tmp_path / "out"
    arguments = ["sample", str(prompts), "--out", str(out), "--batch-size", "1", "--seed", "5", *SAMPLE,
                 "--no-progress"]
    assert cli.main(arguments) == 0
    sd = sdjax.StableDiffusion.default()
    for name, prompt, negative, seed, guidance in [("00000_0.png", "a red circle", None, 5, 1.5),
                                                   ("00001_0.png", "a blue square", "green", 42, 3.0)]:
        alone = sd.text_to_image(prompt, negative, seed=seed, guidance_scale=guidance, steps=2, height=64, width=64,
                                 output="np")[0]
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), alone)
        recorded = parse_infotext(read_png_infotext(out / name))
        assert (recorded.prompt, recorded.seed, recorded.cfg_scale, recorded.steps) == (prompt, seed, guidance, 2)
    rows = [json.loads(line) for line in _manifest(out)]
    assert rows[1] == dict(row=1, image=0, prompt="a blue square", negative_prompt="green", seed=42, guidance=3.0,
                           width=64, height=64, steps=2, sampler="dpmpp_2m", file="00001_0.png")

    changed = list(arguments)
    changed[changed.index("--steps") + 1] = "3"
    capsys.readouterr()
    assert cli.main(changed) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"sdjax sample: error: --out {out} holds a run with --steps 2, not 3; resume with the same settings, "
        "or give another --out"]
    _write(prompts, '{"prompt": "a red circle"}\n')
    assert cli.main(arguments) == 2
    assert "holds a run of another prompts file" in capsys.readouterr().err


def test_incomplete_process_flags_are_one_line_errors(tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.txt", "a red circle\n")
    code = cli.main(["sample", str(prompts), "--out", str(tmp_path / "out"), "--coordinator", "localhost:1234",
                     "--num-processes", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "sdjax sample: error: give --coordinator, --num-processes and --process-id together (or none, to detect "
        "the cluster); missing: --process-id")
    assert not (tmp_path / "out").exists()
