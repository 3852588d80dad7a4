"""Pure tensor functions in the style of torchvision.ops."""

from ddkit.ops.boxes import box_area, box_iou, elementwise_box_iou, order_box_corners
from ddkit.ops.ensemble import (
    box_voting_tensor,
    nms,
    nms_batch,
    nms_method,
    nms_tensor,
    nmw_tensor,
    non_maximum_weighted,
    non_maximum_weighted_batch,
    soft_nms,
    soft_nms_batch,
    soft_nms_tensor,
    wbf_tensor,
    weighted_boxes_fusion,
    weighted_boxes_fusion_batch,
)
