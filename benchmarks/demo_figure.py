"""The README's picture: four of the demo report's figures (align, predict, generate, optimize) in one PNG.

    unf demo --out unf_demo && python benchmarks/demo_figure.py unf_demo benchmarks/figures/demo_overview.png
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = ("align", "predict", "generate", "optimize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", help="the demo's --out folder")
    parser.add_argument("out", help="PNG to write")
    args = parser.parse_args()
    images = [plt.imread(Path(args.demo) / f"{name}.png") for name in PANELS]
    widths = [im.shape[1] for im in images]
    heights = [im.shape[0] for im in images]
    dpi = 100
    fig = plt.figure(figsize=((widths[0] + widths[1]) / dpi / 1.6, (max(heights[:2]) + max(heights[2:])) / dpi / 1.6))
    for i, im in enumerate(images):
        ax = fig.add_subplot(2, 2, i + 1)
        ax.imshow(im, interpolation="antialiased")
        ax.axis("off")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0.02, hspace=0.02)
    fig.savefig(args.out, dpi=dpi * 1.6)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
