"""Each model's forward and backward graph, drawn from the nodes of its tour.

    python demos/graphs.py              writes docs/images/graph-<model>.png
    python demos/graphs.py --out DIR

Nothing here is typed by hand: the nodes are the op pairs that ``npvae.tour`` runs and
checks for one training step, and the edges come from their records. A tensor's
producer is the node that sends its gradient upstream (Node.upstream names dT), its
consumers the nodes that read it (Node.input_shapes); the tour's nodes run in backward
order, so reversed they are a valid forward order, and a tensor read by a consumer is
the one last produced before it. So the pictures change when the model's op sequence
changes.

Forward edges are solid and black. Backward edges are dashed and red, from a consumer
back to its producer, drawn where the consumer really sends a gradient. The VQ-VAE's
straight-through copy (VQ.3) is drawn in orange, and each stop-gradient sg[.] (VQ.4, VQ.5)
is a backward edge cut by a cross: the derivative exists but is dropped on purpose.
Network weights (enc.*, dec.*) are left out; data, noise and the codebook are drawn as
grey inputs.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout too

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from npvae.tour import tour, tour_model  # noqa: E402

# The models the tutorial derives, as `npvae tour` takes them.
MODELS = {
    "vae": ("vae-gaussian", {}),
    "ae": ("ae", dict(sampled=True, likelihood="gaussian")),
    "vqvae": ("vqvae", dict(metric="dot", likelihood="gaussian")),
}
WEIGHT = re.compile(r"^(enc|dec)\.\d+\.[Wb]$")
SKIP_INPUTS = {"idx"}  # the quantizer's choice, handed on as an integer index: no edge


def _tensor(grad_name: str) -> str:
    """'d(enc.0.a)' -> 'enc.0.a', 'dz_e from commitment' -> 'z_e', 'dlogp' -> 'logp'."""
    name = grad_name.split(" from ")[0][1:]
    return name[1:-1] if name.startswith("(") and name.endswith(")") else name


def graph(nodes):
    """The forward graph of one tour: (ops, sources, edges).

    ops: the tour's nodes in forward order. sources: names of inputs no op produces
    (data, noise, the codebook). edges: a list of dicts with ``src`` and ``dst`` (an op
    index or a source name), ``tensor``, and ``back``: "derived" (the consumer sends the
    gradient), "copied" (straight-through), "cut" (a stop-gradient) or None (none flows
    back, as into x, eps or a constant).
    """
    ops = list(reversed(nodes))  # backward order reversed: a forward order
    produces = [{_tensor(name) for name, _, _ in node.upstream} for node in ops]
    sources, edges = [], []
    for j, node in enumerate(ops):
        for tensor in node.input_shapes:
            if WEIGHT.match(tensor) or tensor in SKIP_INPUTS:
                continue
            producer = next((i for i in range(j - 1, -1, -1) if tensor in produces[i]), None)
            if producer is None:
                if tensor not in sources:
                    sources.append(tensor)
                producer = tensor
            d = f"d{tensor}" if "." not in tensor and " " not in tensor else f"d({tensor})"
            if tensor in node.stopped:
                back = "cut"
            elif d in node.grad_shapes:
                back = "copied" if node.copied else "derived"
            else:
                back = None
            edges.append(dict(src=producer, dst=j, tensor=tensor, back=back))
    return ops, sources, edges


def _layout(ops, sources, edges):
    """Columns by longest path from the inputs, folded into a U: the first half of the
    columns left to right along the top (the encoder's side), the rest right to left
    along the bottom (the decoder's side, ending in the loss); each input sits above and
    to the left of the first op that reads it."""
    depth = {}
    for j in range(len(ops)):
        parents = [e["src"] for e in edges if e["dst"] == j and isinstance(e["src"], int)]
        depth[j] = 1 + max((depth[p] for p in parents), default=0)
    columns = {}
    for key, col in depth.items():
        columns.setdefault(col, []).append(key)
    fold = (max(columns) + 1) // 2
    pos = {}
    for col, keys in columns.items():
        top = col <= fold
        x = (col - 1 if top else 2 * fold - col) * 2.4
        for row, key in enumerate(keys):
            y = (len(keys) - 1) / 2 * 1.5 - row * 1.5
            pos[key] = (x, y + 1.9 if top else y - 1.9)
    beside = {}  # inputs already placed by each op
    for source in sources:
        first = min(e["dst"] for e in edges if e["src"] == source)
        x, y = pos[first]
        k = beside[first] = beside.get(first, -1) + 1
        pos[source] = (x - 1.2 - 1.1 * k, y + 1.3)
    return pos


def _label(node) -> str:
    short = node.name.split(" = ")[0] if node.name.startswith(("loss", "likelihood")) else node.name
    text = "\n".join(textwrap.wrap(short, 16, break_long_words=False))
    return f"{text}\n({', '.join(node.tags)})"


def draw(kind: str, path, data_dim: int = 64, title: str | None = None, **options) -> dict:
    """Tour a small model of ``kind`` and draw its graph into the PNG ``path``.

    Returns the graph's counts: ops, sources, forward edges, and backward edges by kind.
    """
    model, x, eps = tour_model(kind, data_dim=data_dim, **options)
    nodes = tour(model, x, eps)
    ops, sources, edges = graph(nodes)
    pos = _layout(ops, sources, edges)
    width = max(p[0] for p in pos.values()) - min(p[0] for p in pos.values()) + 2.6
    height = max(p[1] for p in pos.values()) - min(p[1] for p in pos.values()) + 2.6
    fig = Figure(figsize=(width * 0.62, height * 0.62))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_aspect("equal")  # so the cut marks below land on the curved arrows
    boxes = {}
    for key, (px, py) in pos.items():
        if isinstance(key, int):
            text = _label(ops[key])
            style = dict(boxstyle="round,pad=0.35", fc="#eef3fb", ec="#3060a0")
        else:
            text = key
            style = dict(boxstyle="round,pad=0.3", fc="#e6e6e6", ec="#808080")
        boxes[key] = ax.annotate(text, (px, py), ha="center", va="center", fontsize=6.5,
                                 bbox=style, zorder=3)
    for e in edges:
        src, dst = boxes[e["src"]], boxes[e["dst"]]
        clip = dict(patchA=src.get_bbox_patch(), patchB=dst.get_bbox_patch(), shrinkA=2,
                    shrinkB=2)  # arrows end at the boxes' edges
        ax.annotate("", xy=(0.5, 0.5), xycoords=dst, xytext=(0.5, 0.5), textcoords=src,
                    arrowprops=dict(arrowstyle="-|>", color="black", lw=0.9, **clip), zorder=1)
        if e["back"] is None:
            continue
        color = {"derived": "#c03030", "copied": "#e08000", "cut": "#c03030"}[e["back"]]
        back = dict(patchA=dst.get_bbox_patch(), patchB=src.get_bbox_patch(), shrinkA=2,
                    shrinkB=2, connectionstyle="arc3,rad=0.25")
        ax.annotate("", xy=(0.5, 0.5), xycoords=src, xytext=(0.5, 0.5), textcoords=dst,
                    arrowprops=dict(arrowstyle="-|>", color=color, ls="--",
                                    lw=1.4 if e["back"] == "copied" else 0.9, **back), zorder=2)
        if e["back"] != "derived":
            # the middle of the quadratic curve of arc3 from the consumer to the producer
            (x0, y0), (x1, y1) = pos[e["dst"]], pos[e["src"]]
            mx, my = (x0 + x1) / 2 + 0.125 * (y1 - y0), (y0 + y1) / 2 - 0.125 * (x1 - x0)
            if e["back"] == "cut":
                ax.plot([mx], [my], marker="x", ms=9, mew=2.2, color="#c03030", zorder=4)
                ax.annotate("sg", (mx, my), xytext=(5, 4), textcoords="offset points",
                            fontsize=6.5, color="#c03030", zorder=4)
            else:
                ax.annotate("straight-through\ncopy (VQ.3)", (mx, my), xytext=(0, -30),
                            textcoords="offset points", ha="center", fontsize=6.5,
                            color="#e08000", zorder=4)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.3, max(xs) + 1.3)
    ax.set_ylim(min(ys) - 1.4, max(ys) + 1.2)
    ax.legend(handles=[
        Line2D([], [], color="black", lw=0.9, label="forward"),
        Line2D([], [], color="#c03030", lw=0.9, ls="--", label="backward (derived)"),
        Line2D([], [], color="#e08000", lw=1.4, ls="--", label="backward (copied)"),
        Line2D([], [], color="#c03030", marker="x", ls="none", label="stop-gradient sg[.]"),
    ], loc="lower right", fontsize=6.5, frameon=False, ncol=4)
    ax.set_title(title or nodes.title.splitlines()[0], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    counts = {"ops": len(ops), "sources": len(sources),
              "forward": len(edges)}
    for back in ("derived", "copied", "cut"):
        counts[back] = sum(e["back"] == back for e in edges)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"),
                        help="folder for graph-<model>.png (default docs/images)")
    ns = parser.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    titles = {"vae": "Gaussian VAE (npvae tour vae-gaussian)",
              "ae": "autoencoder, eq. 14 (npvae tour ae --sampled --likelihood gaussian)",
              "vqvae": "VQ-VAE (npvae tour vqvae --metric dot --likelihood gaussian)"}
    for name, (kind, options) in MODELS.items():
        path = out / f"graph-{name}.png"
        counts = draw(kind, path, title=titles[name], **options)
        print(f"wrote {path}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
