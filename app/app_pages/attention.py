"""Attention: per-iteration maps of one layer, the deep model's layers beside them, the
(iteration, layer)² distance matrix (the paper's diagonal stripes) and a floorplan of all maps."""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.measures import attention as att
from analysis import viz
from app import components as ui
from app import session, url_state


GRID_HEADS = 8     # heads side by side in the grid at most
DEFAULT_HEADS = 4  # evenly spaced heads shown first when a model has more than GRID_HEADS

METRICS = {"frobenius": "Frobenius ‖A − B‖ (the paper's)", "js": "Jensen–Shannon (row-wise, nats)",
           "cosine": "1 − cosine"}

s, tpl = ui.page(
    "Attention: does each layer's attention freeze across iterations?",
    "Each small heatmap is one attention map (query down, key across): the grid shows one layer of the looped "
    "block at a few iterations (rows) for every head (columns), beside the deep model's layers. "
    "The distance matrix compares every (iteration, layer) map with every other, and dark diagonal stripes k "
    "apart mean a layer attends the same way in every iteration.",
    "A layer's attention change between iterations is bounded by its input change, so once the state settles "
    "each layer's map matches the same layer in other iterations — diagonal stripes, k apart, in the "
    "(layer, iteration)² distance matrix; the block's stages repeat once per pass. Stripes alone do not prove "
    "reasoning: even a poorly trained model freezes its attention.",
)
t = ui.require_looped(s, attention_for="the maps and their distances")

I, L, H = t.attention.shape[:3]
deep = s.deep if s.deep is not None and s.deep.attention is not None else None
max_heads = max(H, deep.attention.shape[2] if deep is not None else 0)
c1, c2, c3, c4 = st.columns([2, 3, 2, 2])
with c1:
    layer = url_state.view_option("Layer of the block", "attention_layer", list(range(L)), 0,
                              format_func=lambda v: f"layer {v}")
many = max_heads > GRID_HEADS  # a real model's 16–55 heads: the grid shows a chosen few
with c2:
    head_opts = ["all", "mean"] + list(range(max_heads))
    head_choice = url_state.view_option("Heads", "attention_head", head_opts, "all", widget="selectbox",
                                    format_func=lambda v: {"all": "chosen heads (one column each)" if many else
                                                           "every head (one column each)",
                                                           "mean": "mean over heads"}.get(v, f"head {v}"))
chosen = None
if head_choice == "all" and many:
    spread = sorted({round(i * (max_heads - 1) / (DEFAULT_HEADS - 1)) for i in range(DEFAULT_HEADS)})
    chosen = url_state.view_multi(f"Heads in the grid (at most {GRID_HEADS} of {max_heads})", "attention_heads",
                                  list(range(max_heads)), spread, max_selections=GRID_HEADS,
                                  format_func=lambda v: f"head {v}",
                                  help="This model has more heads than fit side by side; the grid shows these "
                                       "(default: evenly spaced). 'mean over heads' averages all of them.") or spread
with c3:
    n_rows = url_state.view_int("Iterations shown", "attention_rows", 1, min(I, 8), min(I, 6),
                            help="First, last and evenly spaced iterations between them (rows of the grid).")
with c4:
    upto = I if I < 2 else url_state.view_int(
        "Up to iteration", "attention_upto", 1, I, I,
        help="Scrub through the iterations: the grid's last row is the map at this iteration (the rows before it "
             "are spaced from iteration 1 to it), and the distance matrix outlines this iteration's maps.")


def outline_iteration(fig, j: int, n_layers: int) -> None:
    """Outline the row and the column of the distance matrix's ``j``-th iteration (its L maps)."""
    lo, hi = j * n_layers - 0.5, (j + 1) * n_layers - 0.5
    for x0, x1, xref, y0, y1, yref in ((lo, hi, "x", 0, 1, "y domain"), (0, 1, "x domain", lo, hi, "y")):
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, xref=xref, yref=yref,
                      line=dict(color="#ff2d55", width=3), layer="above")  # seen on dark and on yellow cells


def grid_head(n_heads: int):
    if head_choice == "all":
        if chosen is None or n_heads <= GRID_HEADS:  # few heads (the deep side's, say): every one
            return "all"
        return [h for h in chosen if h < n_heads] or "all"
    if head_choice == "mean":
        return None
    return int(head_choice) % n_heads


left, right = st.columns(2, gap="large")
with left:
    st.subheader(f"Looped: {ui.model_label(t, s.looped_model, s)}")
    rows = viz.pick_iterations(upto, n_rows)
    st.caption(f"Block layer {layer}, iterations {', '.join(str(r + 1) for r in rows)} of {I}"
               + (f": the last row is the map at iteration {upto}." if upto < I else "."))
    grid_df = viz.attention_grid_data(t, layer=layer, rows=rows, head=grid_head(H))
    ui.show_figure(viz.attention_grid_figure(grid_df, template=tpl), key="attention_grid", data=grid_df)
with right:
    st.subheader(f"Deep: {ui.model_label(s.deep, s.deep_model, s)}")
    if s.deep is None:
        st.info(f"No deep trace: {ui.why_missing(s, 'deep')}")
    elif deep is None:
        st.info("The deep trace has no attention maps.")
    else:
        dL = deep.n_layers
        drows = viz.pick_iterations(dL, n_rows)
        st.caption(f"Layers {', '.join(str(r) for r in drows)} of its {dL} (each runs once).")
        dhead = grid_head(deep.attention.shape[2])
        dgrid_df = viz.attention_grid_data(deep, rows=drows, head=dhead)
        ui.show_figure(viz.attention_grid_figure(dgrid_df, template=tpl), key="attention_deep_grid", data=dgrid_df)

with st.expander("Enlarge one map", icon=":material/zoom_in:", expanded=bool(st.session_state.get("attention_zoom"))):
    z1, z2, z3 = st.columns(3)
    with z1:
        zoom = url_state.view_bool("Show one map large", "attention_zoom", False,
                               help="One attention map of the looped block at full width, to read it on a projector.")
    with z2:
        zoom_it = url_state.view_int("Iteration", "attention_zoom_it", 1, I, I, widget="number")
    with z3:
        zoom_head = url_state.view_option("Head", "attention_zoom_head", ["mean"] + list(range(H)), "mean",
                                      widget="selectbox",
                                      format_func=lambda v: "mean over heads" if v == "mean" else f"head {v}")
    if zoom:
        zh = None if zoom_head == "mean" else int(zoom_head)
        zoom_df = viz.attention_grid_data(t, layer=layer, rows=[zoom_it - 1], head=zh)
        big_fig = viz.attention_grid_figure(zoom_df, template=tpl, width=1400,
                                            title=f"Layer {layer}, iteration {zoom_it}, "
                                                  + ("mean over heads" if zh is None else f"head {zh}"))
        ui.show_figure(big_fig, key="attention_zoom_map", data=zoom_df)

st.subheader("Distance between every (iteration, layer) attention map")
m1, m2 = st.columns([3, 2])
with m1:
    metric = url_state.view_option("Distance", "attention_metric", list(METRICS), "frobenius", format_func=METRICS.get)
head_for_distance = None if head_choice in ("all", "mean") else int(head_choice) % H
with m2:
    st.caption("Maps are averaged over heads first" if head_for_distance is None
               else f"Head {head_for_distance} only (pick 'every head' or 'mean' above to average over heads).")
try:
    matrix = session.measure(att.trace_distance_matrix, t, metric=metric, head=head_for_distance)
    sc = session.measure(att.trace_same_vs_cross_layer, t, metric=metric, head=head_for_distance)
except ValueError as exc:
    st.error(f"Could not compare the attention maps: {exc}")
    matrix = sc = None
if matrix is not None:
    its = att.matrix_iterations(I)
    if len(its) < I:
        st.caption(f"Showing {len(its)} of {I:,} iterations: the matrix and the means beside it are computed on "
                   f"{len(its)} evenly spaced iterations (first and last included), since their cost grows with "
                   "the square of the count.")
    a, b = st.columns([3, 1], gap="large")
    with a:
        dist_df = viz.attention_distance_data(matrix, t, metric=metric, iterations=its)
        dist_fig = viz.attention_distance_figure(dist_df, template=tpl)
        if upto < I and upto - 1 in its and matrix.shape[0] == len(its) * L:
            outline_iteration(dist_fig, its.index(upto - 1), L)
            st.caption(f"Outlined: the maps of iteration {upto} (row and column), compared with every other map.")
        ui.show_figure(dist_fig, key="attention_distance", data=dist_df)
    with b:
        same, cross = sc.get("same_layer", np.nan), sc.get("cross_layer", np.nan)
        ui.metric(st, "Same layer, other iterations", "—" if not np.isfinite(same) else f"{same:.3g}",
                  short="Same layer", template=tpl, help="Mean distance between the maps of one block layer in different iterations.")
        st.metric("Across layers", "—" if not np.isfinite(cross) else f"{cross:.3g}",
                  help="Mean distance between maps of different block layers (any iterations).")
        if np.isfinite(same) and np.isfinite(cross) and same > 0:
            ui.metric(st, "Ratio across / same", f"{cross / same:.3g}×", short="Across / same", template=tpl)
        if I < 2:
            st.caption("Run at least 2 iterations to compare a layer with itself.")
        elif np.isfinite(same) and np.isfinite(cross):
            st.caption("Frozen attention: the same-layer distance is far below the across-layer one."
                       if same < 0.1 * cross else
                       "The same layer still changes noticeably between iterations.")
        if deep is not None:
            dsc = session.measure(att.trace_same_vs_cross_layer, deep, metric=metric, head=None)
            dc = dsc.get("cross_layer", np.nan)
            ui.metric(st, "Deep model: between its layers", "—" if not np.isfinite(dc) else f"{dc:.3g}",
                      short="Deep, across layers", template=tpl, help="The deep model runs each layer once; its layers' maps compared with each other "
                           "(mean over heads).")

st.subheader("Floorplan: all the maps at a glance")
st.caption("Every map averaged over heads; looped: one row per block layer, one column per iteration "
           "(evenly spaced when there are many); the deep model's layers in one row below.")
plan_df = viz.attention_floorplan_data(t)
ui.show_figure(viz.attention_floorplan_figure(plan_df, template=tpl), key="attention_floorplan", data=plan_df)
if deep is not None:
    dplan_df = viz.attention_floorplan_data(deep)
    ui.show_figure(viz.attention_floorplan_figure(dplan_df, template=tpl, title="Deep model: each layer's head-averaged map"),
                   key="attention_deep_floorplan", data=dplan_df)
