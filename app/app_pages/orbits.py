"""Orbits: per-token trajectories of the block state in PCA and UMAP, looped beside deep."""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.measures.projections import project_across_tokens, project_token
from analysis import viz
from analysis.viz.theme import plain_text
from app import components as ui
from app import caching, session, url_state

s, tpl = ui.page(
    "Orbits: where each token's state travels",
    "Every point is one token's block state after one layer call, projected to two or three dimensions and "
    "joined in the order the model computes them, from the open circles (first iteration) to the diamonds (last). "
    "A path that spirals into a small cycle of k points has reached the block's per-layer fixed points; the deep "
    "model's path (right) visits each layer once.",
    "Per token, a PCA of one token's states shows a k-cycle: with a k-layer block the state alternates between "
    "k distinct fixed points, one per layer (unless they collapse into one). Huginn's latent orbits: most "
    "tokens converge, a few circle (orbits) or drift (sliders).",
)

PROJ = {"pca": "PCA across tokens", "token": "PCA of one token", "umap": "UMAP (neighbourhoods)"}
c1, c2, c3, c4 = st.columns([3, 1.3, 2, 2])
with c1:
    proj = url_state.view_option("Projection", "o_proj", list(PROJ), "pca", format_func=PROJ.get,
                             help="PCA keeps geometry (distances, cycles); UMAP is a seeded, non-linear "
                                  "neighbourhood view.")
with c2:
    dim = url_state.view_option("View", "o_dim", ["2D", "3D"], "2D")
with c3:
    if proj == "pca" and dim == "2D":
        pcs = url_state.view_option("Components", "o_pcs", ["1-2", "3-4", "5-6"], "1-2",
                                format_func=lambda v: "PC " + v.replace("-", "–"))
    else:
        pcs = "1-2"
        st.caption("Components: " + ("1–2–3" if dim == "3D" else "1–2"))
with c4:
    color_by = url_state.view_option("Colour by", "o_color", ["iteration", "token", "layer"], "iteration")

t, d = s.looped, s.deep
ref = t or d
token = None
o1, o2, o3 = st.columns([2, 2, 3])
with o1:
    if proj == "token" and ref is not None:
        n = ref.n_tokens
        token = ui.token_picker("Token", "o_token", ref,
                                help="0 is the first token; the default is the last position, where the "
                                     "answer is predicted.")
    elif proj == "pca":
        center = url_state.view_bool("Centre each path on its own mean", "o_center", False,
                                 help="Overlaps the paths so their shapes (cycles, spirals) can be compared.")
with o2:
    animate = url_state.view_bool("Animate iterations", "o_anim", False,
                              help="Adds a play button and an iteration slider; first and last iteration stay shown.")
with o3:
    upto = None
    if t is not None and t.n_iterations > 1 and not animate:
        upto = url_state.view_int("Show paths up to iteration", "o_upto", 1, t.n_iterations, t.n_iterations,
                              help="Scrub through the iterations; the first and the last are always marked.")
center = bool(st.session_state.get("o_center", False)) if proj == "pca" else False
dims = (0, 1, 2) if dim == "3D" else {"1-2": (0, 1), "3-4": (2, 3), "5-6": (4, 5)}[pcs]


def coords_of(trace):
    """(coords, axis label, PCA or None, iterations or None) for the chosen projection of one
    trace (iterations: the subset a bounded UMAP was fitted on); None when the
    projection cannot be fitted (a st.warning says why, and the figure is skipped)."""
    try:
        return _coords_of(trace)
    except Exception as exc:  # e.g. NaN from the first iteration on: no finite states to fit
        finite = int(np.isfinite(trace.states).all(axis=-1).sum())
        total = int(np.prod(trace.states.shape[:-1]))
        st.warning(f"The {PROJ[proj]} projection of this {'deep' if trace.is_deep else 'looped'} trace could not be "
                   f"computed ({exc}); {finite} of its {total} states are finite (NaN or infinite states are left "
                   "out, and a projection needs at least a few finite ones). The figure is skipped.")
        return None


def _coords_of(trace):
    if proj == "pca":
        coords, pca = session.measure(project_across_tokens, trace, n_components=6, center_per_trajectory=center)
        return coords, "PC", pca, None
    if proj == "token":
        k = min(token if token is not None else trace.n_tokens - 1, trace.n_tokens - 1)
        coords, pca = session.measure(project_token, trace, token=k, n_components=3)
        return coords, "PC", pca, None
    session.heavy_turn()  # UMAP is heavy work at any length: one such view at a time (app/heavy.py)
    with st.status("UMAP: fitting a seeded neighbourhood embedding…", expanded=False) as status:
        try:
            caching.warm_umap()
            coords = session.measure(ui.umap_coords, trace, n_components=3 if dim == "3D" else 2,
                                   seed=int(s.settings.seed))
        except Exception:
            status.update(label="UMAP could not be fitted", state="error")
            raise
        status.update(label="UMAP ready", state="complete")
    its = ui.umap_iterations(trace)
    if len(its) < trace.n_iterations:
        per = trace.n_layers * trace.n_tokens
        st.caption(f"Showing {len(its)} of {trace.n_iterations:,} iterations: UMAP is fitted on "
                   f"{len(its) * per:,} of the {trace.n_iterations * per:,} states (evenly spaced iterations, first "
                   f"and last included), since its cost grows faster than the number of states.")
    return coords, "UMAP", None, its


def explained(pca) -> str:
    ratio = getattr(pca, "explained_variance_ratio_", None)
    if ratio is None:
        return ""
    shown = [f"PC{i + 1} {ratio[i]:.0%}" for i in dims if i < len(ratio)]
    return "Variance explained: " + ", ".join(shown) + "."


def draw(tr, key: str, title: str, color: str, frame_by=None, upto_=None, caption: str = "") -> None:
    """One model's projected paths with its export row (nothing when the projection cannot be fitted)."""
    got = coords_of(tr)
    if got is None:
        return
    coords, label, pca, its = got  # its: the iterations a bounded UMAP used (None: all of them)
    k = min(token, tr.n_tokens - 1) if token is not None else None
    if its is not None and len(its) < tr.n_iterations:
        title = title.replace(f"{tr.n_iterations} iterations", f"{len(its)} of {tr.n_iterations} iterations")
    df = viz.orbit_data(coords, tr, token=k, axis_label=label, iterations=its)
    fig = viz.orbit_figure(df, dims=dims, color_by=color, frame_by=frame_by, upto=upto_, template=tpl,
                           title=title + (f", token {k} '{plain_text(tr.token_labels[k])}'" if k is not None else ""))
    ui.show_figure(fig, key=key, data=df)
    st.caption(caption + explained(pca))


left, right = st.columns(2, gap="large")
with left:
    st.subheader(f"Looped: {ui.model_label(t, s.looped_model, s)}")
    if t is None:
        st.info(f"No looped trace: {ui.why_missing(s, 'looped')}")
    else:
        draw(t, "orbit_looped", f"{PROJ[proj]}: {t.n_iterations} iterations × {t.n_layers} layers", color_by,
             frame_by="iteration" if animate else None, upto_=upto)
with right:
    st.subheader(f"Deep: {ui.model_label(d, s.deep_model, s)}")
    if d is None:
        st.info(f"No deep trace: {ui.why_missing(s, 'deep')}")
    elif proj == "token" and ui.tokens_differ(s):
        st.info(ui.tokens_differ(s))
    else:
        draw(d, "orbit_deep", f"{PROJ[proj]}: the deep model's {d.n_layers} layers",
             "token" if color_by == "token" else "layer",
             caption="Its own projection (fit on the deep model's states), one point per layer. ")
