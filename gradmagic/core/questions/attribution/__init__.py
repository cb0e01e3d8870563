"""Attribution: integrated gradients, saliency (SmoothGrad), Grad-CAM and token gradients.

Nothing is re-exported here: :mod:`gradmagic.core` is the one public door.
"""
