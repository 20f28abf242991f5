"""Plotly figures of traces and measures, one module per view (``answer``, ``orbits``,
``convergence``, ``attention``, ``stages``, ``correspondence``, ``audit``) and the shared ``theme``. Each
chart is two functions: ``*_data`` turns a trace or a measure into a tidy pandas frame (columns in
the vocabulary of ``analysis.measures.tables``; the frame is also the chart's CSV) and the builder
``(frame, presentation options, template=) -> plotly.graph_objects.Figure`` draws only that
frame, so what is drawn is what is exported. No Streamlit."""
from .answer import accuracy_data, accuracy_figure, answer_data, answer_figure, lens_data, lens_heatmap
from .audit import (audit_accuracy_data, audit_accuracy_figure, audit_class_data, audit_class_figure, audit_cost_data,
                    audit_cost_figure, audit_exit_data, audit_exit_figure, audit_exit_histogram_data,
                    audit_exit_histogram_figure, audit_figures, audit_frames)
from .attention import (GRID_PAD_X, GRID_PAD_Y, attention_distance_data, attention_distance_figure,
                        attention_floorplan_data, attention_floorplan_figure, attention_grid_data, attention_grid_figure,
                        attention_grid_height)
from .convergence import (class_data, class_figure, contraction_data, contraction_figure, distance_data,
                          fixed_point_cosine_data, fixed_point_cosine_figure, fixed_point_distance_figure, lab_step_data,
                          lab_step_figure, spread_data, spread_figure, step_data, step_size_figure)
from .correspondence import (KL_FLOOR, answer_rank_data, answer_rank_figure, cka_data, cka_figure, early_exit_data,
                             early_exit_kl_figure)
from .orbits import orbit_data, orbit_figure
from .stages import STAGE_METRICS, stage_data, stage_profile_figure
from .theme import (DEEP_COLOR, DEEP_LINE, LOOPED_COLOR, PALETTE, SEQUENTIAL, TEMPLATES, pick_iterations, theme,
                    token_names)
