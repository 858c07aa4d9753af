"""Explanations: which part of the image drove the model's decision (Grad-CAM and friends), and the files a
clinician reads (overlay, heatmap, JSON, an offline HTML report).

    from leukoscope.explain import explain
    e = explain("cell.png")                 # default model leukemia-cell, Grad-CAM
    e.label, e.confidence, e.heatmap, e.overlay
"""

from leukoscope.explain.cam import CAM, METHODS, explain_tensor, get_method, occlusion_map, tokens_to_grid
from leukoscope.explain.core import Explanation, explain, gradcam_array, hottest_region
from leukoscope.explain.overlay import blend, render_overlay
from leukoscope.explain.report import write_explanations

__all__ = ["CAM", "METHODS", "Explanation", "blend", "explain", "explain_tensor", "get_method", "gradcam_array",
           "hottest_region", "occlusion_map", "render_overlay", "tokens_to_grid", "write_explanations"]
