"""``kdctl predict``: detections drawn on images, folders, globs and videos, as COCO results and YOLO labels.

Modules: :mod:`~kdctl.predict.sources` (what SOURCE names, frames), :mod:`~kdctl.predict.engine`
(:func:`~kdctl.predict.engine.predict_paths`), :mod:`~kdctl.predict.draw` (drawing, YOLO lines, COCO entries),
:mod:`~kdctl.predict.onnx_runner` (exported graphs in onnxruntime), :mod:`~kdctl.predict.load` (SPEC -> model).
"""
