"""Dataset formats, each read into the COCO dict that :func:`kdctl.data.validate.validate_coco` checks.

One module per format, each with ``looks_like(root)`` (detection), ``splits(root)`` (the splits present, named
train, val and test) and ``read(root, split, deep=)`` (a validated :class:`kdctl.data.validate.CocoData`):

* :mod:`.coco`: ``DIR/{split}.json`` + ``DIR/images/``, the official ``annotations/instances_{split}2017.json``
  + ``{split}2017/``, and Roboflow's ``{train,valid,test}/_annotations.coco.json`` with the images beside them;
* :mod:`.yolo`: ``data.yaml`` + ``images/`` + ``labels/`` (normalised ``class cx cy w h`` lines);
* :mod:`.voc`: Pascal VOC ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``;
* :mod:`.hf`: a Hugging Face ``datasets`` object-detection dataset (``save_to_disk`` folder or parquet files).

:mod:`.write` writes a validated split as COCO or YOLO (``kdctl data convert``). :mod:`kdctl.data.coco` picks the
format (``detect_format``) and dispatches.
"""
