"""`coca demo`: the whole model card in one run, on real sample photos."""
from __future__ import annotations

from pathlib import Path

from coca.errors import WeightsUnavailableError

BANNER = """
########################################################################
#  Pretrained weights are not reachable here: using RANDOM weights.    #
#  Captions and rankings below are meaningless; the plumbing is real.  #
########################################################################
"""

DESCRIPTIONS = ["an astronaut in a space suit", "a cup of coffee", "a cat", "a rocket on a launch pad"]


def sample_photos(folder: Path) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ["astronaut", "coffee", "chelsea", "rocket"]:
        path = folder / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=92)
        paths.append(path)
    return paths


def load_demo_model(args):
    import coca

    try:
        return coca.load(args.model, pretrained=args.pretrained, seed=args.seed, dtype=args.dtype)
    except WeightsUnavailableError as exc:
        print(BANNER + f"# reason: {exc}\n")
        return coca.load(args.model, pretrained="random", seed=args.seed, dtype=args.dtype)


def run_demo(args) -> int:
    from coca import plots, media

    out = Path(args.out)
    photos = sample_photos(out / "photos")
    model = load_demo_model(args)
    print(f"model {model.model_name} ({model.pretrained}), {model.dtype}")
    print("\n== captions (greedy, KV cache) ==")
    for path, cap in zip(photos, model.caption([str(p) for p in photos])):
        print(f"{path.name:>14}  {cap.text}")
    print("\n== text -> image ranking (cosine distance, smaller is closer) ==")
    for path in photos[:2]:
        best = model.rank(str(path), DESCRIPTIONS)[0]
        print(f"{path.name:>14}  {best[1]:.4f}  {best[0]}")
    print("\n== zero-shot classification ==")
    labels = ["astronaut", "coffee", "cat", "rocket"]
    for path in photos:
        label, prob = model.classify(str(path), labels)[0]
        print(f"{path.name:>14}  {label} ({prob:.1%})")
    enc = model.encode_images([str(photos[0])], want_attention=True)
    grid = model.net.visual.grid
    heat = enc.attention[0][:, 0, 1:].reshape(-1, grid, grid).float().numpy()
    png = plots.image_attention_png(media.load_image(photos[0]), heat, out / "attention.png")
    print(f"\nattention map: {png}")
    return 0
