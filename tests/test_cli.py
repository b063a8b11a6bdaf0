"""The `coca` command line, in process (fast) and once as the installed console script."""
import json
import subprocess
import sys

import numpy as np
import pytest

from clients.cli import main

TINY = ["--model", "coca-tiny", "--pretrained", "random"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_prints_one_line_per_file(capsys, images):
    code, out, _ = run(capsys, "caption", *images[:2], *TINY, "--max-tokens", "6")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images[:2]
    assert all(line.split("\t")[1] for line in lines)


def test_caption_video(capsys, tmp_path):
    from tests.test_model_equality import make_video

    video = make_video(tmp_path / "v.mp4")
    code, out, _ = run(capsys, "caption", str(video), *TINY, "--frames", "4", "--max-tokens", "5")
    assert code == 0 and out.startswith(str(video) + "\t")


def test_embed_image_json_lines_and_npy(capsys, images, tmp_path):
    code, out, _ = run(capsys, "embed-image", images[0], *TINY)
    vector = np.array(json.loads(out)["embedding"])
    assert code == 0 and vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    npy = tmp_path / "e.npy"
    assert run(capsys, "embed-image", *images, *TINY, "--out", str(npy))[0] == 0
    assert np.load(npy).shape == (len(images), 64)


def test_rank_is_sorted_by_distance(capsys, images):
    code, out, _ = run(capsys, "rank", images[0], "a cat", "a rocket", "coffee", *TINY)
    distances = [float(line.split()[0]) for line in out.strip().splitlines()[1:]]
    assert code == 0 and len(distances) == 3 and distances == sorted(distances)


def test_classify_probabilities_sum_to_one(capsys, images):
    code, out, _ = run(capsys, "classify", images[2], "--labels", "cat,dog,rocket", *TINY)
    probs = [float(line.split()[0].rstrip("%")) for line in out.strip().splitlines()[1:]]
    assert code == 0 and abs(sum(probs) - 100) < 0.1


def test_eval_zero_shot_reports_accuracy_and_confusion(capsys, images, tmp_path):
    import shutil

    for cls, picks in {"astronaut": images[:1], "cat": images[2:3], "rocket": images[3:]}.items():
        (tmp_path / cls).mkdir()
        for p in picks:
            shutil.copy(p, tmp_path / cls)
    code, out, _ = run(capsys, "eval-zero-shot", str(tmp_path), *TINY, "--json")
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["images"] == 3 and summary["classes"] == 3
    assert 0 <= summary["accuracy"] <= 1 and "confusion" in out


def test_attention_pngs(capsys, images, tmp_path):
    from PIL import Image

    png = tmp_path / "a.png"
    assert run(capsys, "attention", images[0], *TINY, "--out", str(png))[0] == 0
    assert Image.open(png).size[0] > 200
    png2 = tmp_path / "t.png"
    assert run(capsys, "attention-text", "a portrait of a woman with red hair", *TINY, "--out", str(png2))[0] == 0
    assert Image.open(png2).format == "PNG"


def test_info_counts_parameters(capsys):
    code, out, _ = run(capsys, "info", "--model", "coca_ViT-B-32", "--pretrained", "random")
    assert code == 0 and "253,560,065" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["caption", "missing.jpg", *TINY], "missing.jpg"),
        (["embed-text", "  ", *TINY], "empty"),
        (["caption", "x.jpg", "--model", "coca_ViT-Z-99", "--pretrained", "random"], "unknown model 'coca_ViT-Z-99'"),
        (["caption", "x.jpg", "--model", "coca-tiny", "--pretrained", "no_such_tag"], "unknown pretrained tag"),
        (["caption", "x.jpg", "--model", "coca_ViT-B-32", "--pretrained", "laion2b_s13b_b90k"], "random"),
        (["caption", "x.jpg", *TINY, "--top-p", "0"], "top_p"),
        (["classify", "x.jpg", "--labels", ",", *TINY], "label"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, images, argv, words):
    argv = [images[0] if a == "x.jpg" else str(tmp_path / a) if a == "missing.jpg" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err


def test_not_an_image_names_the_file(capsys, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    code, _, err = run(capsys, "caption", str(bad), *TINY)
    assert code == 2 and "notes.jpg" in err and "not an image" in err


def test_console_script_exit_code():
    coca_bin = sys.executable.replace("/python", "/coca")
    proc = subprocess.run([coca_bin, "caption", "/nonexistent.png", *TINY], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert proc.stderr.startswith("coca caption: error:") and "/nonexistent.png" in proc.stderr


def test_plot_images_and_texts(capsys, images, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images:
        (folder / p.split("/")[-1]).write_bytes(open(p, "rb").read())
    out = tmp_path / "tsne.png"
    assert run(capsys, "plot", str(folder), *TINY, "--out", str(out))[0] == 0
    assert Image.open(out).format == "PNG"
    out2 = tmp_path / "texts.png"
    assert run(capsys, "plot", "--texts", "Paris", "New York", "a cat", *TINY, "--out", str(out2), "--method", "pca")[0] == 0
    assert out2.stat().st_size > 1000


def test_bench_runs_the_benchmark_program(capfd):
    """`coca bench NAME` runs `python -m bench NAME` (the CLI imports no benchmark code)."""
    assert main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark 'no-such-bench'" in capfd.readouterr().err
