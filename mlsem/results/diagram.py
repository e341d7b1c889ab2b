"""Path diagrams of the wide SEM, drawn from the parameter table.

The picture follows the seed's drawing: boxes for the observed outcome and
covariates of every slot, circles for the latent effects (the county effect,
one school effect per school slot, ...), single-headed paths with their
labels or fixed values (the coefficient's name, ``1`` for a fixed loading),
double-headed arcs for variances and covariances with their labels, and the
estimates on the paths when a fitted result is given.  Equal labels are
equality constraints: that is how the mixed model reads as a constrained SEM.

Everything is derived from the :class:`~mlsem.spec.table.ParamTable` (phi and
theta entries, beta parameters) plus the slot -> latent loadings, so a
relaxed table (say, a free covariance between the school effects of slots 1
and 2) draws its extra arcs without special code.  Many slots collapse into
a few boxes with a count, so the picture of a model with hundreds of slots
stays readable.

DOT text is always available (:func:`to_dot`); SVG and PNG go through
Graphviz's ``dot`` program (Debian/Ubuntu: ``apt-get install graphviz``;
macOS: ``brew install graphviz``; conda: ``conda install graphviz``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..errors import MlsemError

NO_GRAPHVIZ = ("diagram: writing {out!r} needs Graphviz's 'dot' program, which is not installed "
               "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; conda: "
               "conda install graphviz). Write a .dot file instead and render it elsewhere.")
FORMATS = ("dot", "gv", "svg", "png", "pdf")


@dataclass
class DiagramModel:
    """What a diagram needs: the parameter table and how slots load on latents.

    ``loadings``: (slot, latent, label) with label "1" for a fixed loading of
    1 or a covariate name for a random slope (the loading is that covariate's
    value in the slot)."""
    table: object
    outcome: str
    slot_names: list
    loadings: list
    xnames: list
    estimates: dict = field(default_factory=dict)
    title: str = ""

    @property
    def latent_names(self) -> list:
        return list(self.table.latent_names)


# ---- building the model description ---------------------------------------------
def from_prep(prep, table, outcome: str, estimates=None, title: str = "") -> DiagramModel:
    lab = prep.slot_labels.sort("slot")
    cols = [c for c in lab.columns if c != "slot"]
    names = [",".join(str(v) for v in r) for r in lab.select(cols).iter_rows()]
    loadings = []
    for s in range(prep.nslots):
        for c in range(prep.slot_lat.shape[1]):
            g = int(prep.slot_lat[s, c])
            if g < 0:
                continue
            eff = prep.latent_term[g][1]
            loadings.append((s, g, "1" if eff == "Intercept" else eff))
    return DiagramModel(table, outcome, names, loadings, list(prep.xnames), dict(estimates or {}), title)


def from_result(res) -> DiagramModel:
    m = res.model
    if getattr(m.table, "nout", 1) > 1:
        raise MlsemError("diagram: not available for a fit of several outcomes yet")
    return from_prep(m.prep, m.table, res.outcome, res.coef,
                     title=f"{res.formula}   (loglik {res.loglik:.3f}, {res.nobs:,} obs)")


def from_formula(formula: str, design=(2, 2), *, effects=None, residuals=None,
                 coefficients=None, index=None) -> DiagramModel:
    """The model of ``formula`` on a template design: one top-level unit with
    ``design`` groups below it (e.g. (2, 2): 2 schools of 2 pupils), labelled
    1, 2, ...; ``effects``, ``residuals``, ``coefficients`` relax it as
    :func:`mlsem.fit` does (``index`` names the template's observation
    numbers, for residual correlations that need an order)."""
    from ..data.prepare import prepare
    from ..data.encode import encode
    from ..spec.formula import effects_of, nest_levels, parse_formula
    from ..spec.relax import coefficient_design, relax_table
    from ..spec.table import multilevel_table
    effects_relax = effects
    F = parse_formula(formula)
    levels = nest_levels(F)
    level_cols = [lv[-1] for lv in levels]
    design = list(design)
    if len(design) != len(levels):
        raise MlsemError(
            f"--design {'x'.join(map(str, design))!r}: the formula has {len(levels) - 1} level(s) below "
            f"{level_cols[0]!r}, so give {len(levels)} sizes (groups per level, then observations per group)")
    grids = np.meshgrid(*[np.arange(1, n + 1) for n in design], indexing="ij")
    cells = {c: g.ravel() for c, g in zip(level_cols[1:] + ["__obs"], grids)}
    n = len(cells["__obs"])
    rng = np.random.default_rng(0)
    data = {level_cols[0]: np.ones(n, dtype=np.int64)}
    data.update({c: cells[c].astype(np.int64) for c in level_cols[1:]})
    data[F.outcome] = rng.standard_normal(n)
    effects = {}
    for rt in F.random:
        effects[len(rt.group) - 1] = list(rt.effects)
    for c in F.columns:
        if c not in data:   # positive, so that log() and sqrt() of a template covariate exist
            data[c] = rng.uniform(1.0, 2.0, n)
    if index is not None:
        data[index] = cells["__obs"].astype(np.int64)
    df, F, _ = encode(pl.DataFrame(data), F)
    effects = effects_of(F)
    prep = prepare(df, F.outcome, list(F.fixed), F.intercept, levels, effects, index=index,
                   design=coefficient_design(coefficients, F, levels))
    table = relax_table(multilevel_table(prep, F, levels), prep, effects_relax, residuals, index)
    return from_prep(prep, table, F.outcome, title=formula)


# ---- layout -------------------------------------------------------------------------
def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _chain(nodes) -> list:
    """Invisible edges that keep the nodes of one rank in slot order."""
    return [f"    {a} -> {b} [style=invis];" for a, b in zip(nodes, nodes[1:])]


def _html(s: str) -> str:
    s = str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("\n", "<br/>")


def _kind(name: str) -> str:
    """The level of a latent from its name: "j[1]" -> "j", "k:x" -> "k"."""
    return name.split("[")[0].split(":")[0]


class _Layout:
    """Which slots and latents are drawn, and what each stands for."""

    def __init__(self, dm: DiagramModel, max_slots: int):
        P = len(dm.slot_names)
        M = dm.table.nlatent
        lat_of_slot = [set() for _ in range(P)]
        for s, g, _ in dm.loadings:
            lat_of_slot[s].add(g)
        common = set.intersection(*lat_of_slot) if P else set()
        # groups of slots: slots loading on the same non-shared latents
        keys, order = {}, []
        for s in range(P):
            k = frozenset(lat_of_slot[s] - common)
            if k not in keys:
                keys[k] = []
                order.append(k)
            keys[k].append(s)
        boxes = []                               # (list of slots, label)
        if P <= max_slots:
            boxes = [[s] for s in range(P)]
            rest_slots = []
        else:
            budget = max(max_slots - 1, 1)
            shown = 0
            gi = 0
            while gi < len(order) and gi < 2 and shown < budget:
                sl = keys[order[gi]]
                if len(sl) <= 3 and shown + len(sl) <= budget:
                    boxes += [[s] for s in sl]
                    shown += len(sl)
                else:
                    boxes.append(list(sl))
                    shown += 1
                gi += 1
            rest_slots = [s for k in order[gi:] for s in keys[k]]
            if rest_slots:
                boxes.append(rest_slots)
        self.boxes = boxes
        self.box_of_slot = np.full(P, -1, dtype=np.int64)
        for b, sl in enumerate(boxes):
            self.box_of_slot[sl] = b
        # latents: drawn singly if a shown box uses them, else one circle per kind
        shown_lat = set()
        for sl in boxes:
            if len(sl) == 1 or sl is not boxes[-1] or not rest_slots:
                for s in sl:
                    shown_lat |= lat_of_slot[s]
        used = set().union(*lat_of_slot) if P else set()
        self.lat_disp = {}
        self.disp_members = {}
        for g in range(M):
            if g not in used:
                continue
            name = dm.latent_names[g] if g < len(dm.latent_names) else f"eta{g}"
            d = f"L{g}" if g in shown_lat else f"R_{_kind(name)}"
            self.lat_disp[g] = d
            self.disp_members.setdefault(d, []).append(g)
        self.rest = bool(rest_slots)


def to_dot(dm: DiagramModel, max_slots: int = 8, digits: int = 3) -> str:
    """Graphviz DOT text of the model."""
    t = dm.table
    est = dm.estimates or {}
    names = t.names
    lay = _Layout(dm, max(int(max_slots), 2))
    y = dm.outcome

    def plabel(p: int) -> str:
        n = names[p]
        if n in est:
            return f"{n}\n= {est[n]:.{digits}g}"
        return n

    lines = ["digraph mlsem {",
             "  graph [rankdir=TB, nodesep=0.6, ranksep=0.8, fontname=\"Helvetica\", fontsize=12"
             + (f", label={_q(dm.title)}, labelloc=t" if dm.title else "") + "];",
             "  node [fontname=\"Helvetica\", fontsize=12];",
             "  edge [fontname=\"Helvetica\", fontsize=10];"]
    # latents, grouped by kind on one rank
    by_kind = {}
    for d, members in lay.disp_members.items():
        kind = _kind(dm.latent_names[members[0]])
        by_kind.setdefault(kind, []).append((d, members))
    for kind, items in by_kind.items():
        lines.append("  { rank=same;")
        for d, members in items:
            if len(members) == 1:
                label = dm.latent_names[members[0]]
            else:
                first, last = dm.latent_names[members[0]], dm.latent_names[members[-1]]
                label = f"{first} ... {last}\n({len(members)} latents)"
            lines.append(f"    {d} [shape=ellipse, label={_q(label)}];")
        lines.append("  }")
    kinds = list(by_kind)
    for k0, k1 in zip(kinds, kinds[1:]):
        lines.append(f"  {by_kind[k0][0][0]} -> {by_kind[k1][0][0]} [style=invis];")
    # outcome boxes; the intercept is written inside them (as Stata's sem draws it)
    icpt = ""
    if "Intercept" in dm.xnames:
        icpt = "\n" + plabel(int(t.beta_param[dm.xnames.index("Intercept")])).replace("\n", " ")
    lines.append("  { rank=same;")
    for b, sl in enumerate(lay.boxes):
        if len(sl) == 1:
            label = f"{y}[{dm.slot_names[sl[0]]}]{icpt}"
        else:
            more = " more" if (lay.rest and b == len(lay.boxes) - 1) else ""
            label = f"{y}[{dm.slot_names[sl[0]]}] ... {y}[{dm.slot_names[sl[-1]]}]\n({len(sl)}{more} slots){icpt}"
        style = "" if len(sl) == 1 else ", peripheries=2"
        lines.append(f"    Y{b} [shape=box, label={_q(label)}{style}];")
    lines += _chain([f"Y{b}" for b in range(len(lay.boxes))])
    lines.append("  }")
    # covariates: one box per design column per outcome box
    xcols = [c for c, n in enumerate(dm.xnames) if n != "Intercept"]
    if xcols:
        lines.append("  { rank=same;")
        for b, sl in enumerate(lay.boxes):
            for c in xcols:
                xn = dm.xnames[c]
                if len(sl) == 1:
                    label = f"{xn}[{dm.slot_names[sl[0]]}]"
                else:
                    label = f"{xn}[{dm.slot_names[sl[0]]}] ... {xn}[{dm.slot_names[sl[-1]]}]\n({len(sl)} slots)"
                style = "" if len(sl) == 1 else ", peripheries=2"
                lines.append(f"    X{b}_{c} [shape=box, label={_q(label)}{style}];")
        lines += _chain([f"X{b}_{c}" for b in range(len(lay.boxes)) for c in xcols])
        lines.append("  }")
    # loadings (latent -> outcome)
    seen = set()
    for s, g, lab in dm.loadings:
        key = (lay.lat_disp[g], int(lay.box_of_slot[s]), lab)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"  {key[0]} -> Y{key[1]} [label={_q(lab)}];")
    # regressions (covariate -> outcome), drawn below the outcomes
    for b in range(len(lay.boxes)):
        for c in xcols:
            p = int(t.beta_param[c])
            lines.append(f"  Y{b} -> X{b}_{c} [dir=back, label={_q(plabel(p))}];")
    # variances and covariances of latents (phi) and residuals (theta)
    arcs = {}

    def add_arc(a, b, p, among):
        if (b, a) in arcs or (a, b) in arcs:
            k = (a, b) if (a, b) in arcs else (b, a)
        else:
            k = (a, b)
            arcs[k] = []
        lab = plabel(p) + (" (among)" if among else "")
        if lab not in arcs[k]:
            arcs[k].append(lab)

    for r, c, p in zip(t.phi_row, t.phi_col, t.phi_param):
        if r > c or r not in lay.lat_disp or c not in lay.lat_disp:
            continue
        a, b = lay.lat_disp[int(r)], lay.lat_disp[int(c)]
        add_arc(a, b, int(p), a == b and r != c)
    for r, c, p in zip(t.theta_row, t.theta_col, t.theta_param):
        if r > c:
            continue
        a, b = f"Y{lay.box_of_slot[r]}", f"Y{lay.box_of_slot[c]}"
        add_arc(a, b, int(p), a == b and r != c)
    for (a, b), labs in arcs.items():
        label = "\n".join(labs)
        if a == b:
            # distinct ports so that both arrowheads of the loop are visible
            p0, p1 = ("nw", "ne") if a.startswith(("L", "R_")) else ("ne", "se")
            lines.append(f"  {a}:{p0} -> {a}:{p1} [dir=both, arrowsize=0.6, color=gray30, "
                         f"fontcolor=gray20, label={_q(label)}];")
        else:
            # an HTML label on a white cell, so paths crossing the arc do not hide it
            cells = "".join(f"<tr><td>{_html(x)}</td></tr>" for x in labs)
            html = f'<<table border="0" cellborder="0" cellspacing="0" bgcolor="white">{cells}</table>>'
            # residual covariances leave the boxes from below, clear of the variance loops
            ports = ":sw" if a.startswith("Y") else ""
            portb = ":se" if a.startswith("Y") else ""
            lines.append(f"  {a}{ports} -> {b}{portb} [dir=both, constraint=false, style=dashed, arrowsize=0.6, "
                         f"color=gray30, fontcolor=gray20, label={html}];")
    # parameters that no entry of the table draws (e.g. a structured residual
    # correlation computed by a function of the table): listed, not lost
    used = set(int(p) for p in t.beta_param) | set(int(p) for p in t.phi_param) | set(
        int(p) for p in t.theta_param)
    rest = [plabel(p).replace("\n", " ") for p in range(len(names)) if p not in used]
    if rest:
        lines.append(f"  NOTE [shape=note, fontsize=10, label={_q('not drawn as paths: ' + ', '.join(rest))}];")
        lines.append(f"  Y{len(lay.boxes) - 1} -> NOTE [style=invis];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- rendering ----------------------------------------------------------------------
def have_graphviz() -> bool:
    return shutil.which("dot") is not None


def format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise MlsemError(f"diagram: cannot tell the format of {path!r}; use .dot, .svg, .png or .pdf")
    return "dot" if ext == "gv" else ext


def render(dot_text: str, fmt: str) -> bytes:
    """Render DOT text with Graphviz to ``fmt`` (svg, png, pdf)."""
    if fmt == "dot":
        return dot_text.encode()
    exe = shutil.which("dot")
    if exe is None:
        raise MlsemError(NO_GRAPHVIZ.format(out=f"*.{fmt}"))
    args = [exe, f"-T{fmt}"] + (["-Gdpi=110"] if fmt == "png" else [])
    proc = subprocess.run(args, input=dot_text.encode(), capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise MlsemError(f"diagram: Graphviz failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def write(dot_text: str, path: str) -> None:
    """Write the diagram to ``path`` (format from the extension), atomically."""
    from .export import atomic_write
    data = render(dot_text, format_of(path))

    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, w)


def diagram(model, path: str | None = None, *, design=(2, 2), max_slots: int = 8) -> str:
    """DOT text of a fitted result or a formula; written to ``path`` if given."""
    if isinstance(model, str):
        dm = from_formula(model, design)
    elif isinstance(model, DiagramModel):
        dm = model
    else:
        dm = from_result(model)
    text = to_dot(dm, max_slots=max_slots)
    if path is not None:
        write(text, path)
    return text
