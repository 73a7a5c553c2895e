"""napari plugin (``pip install 'maskrcnn[napari]'``): a dock widget that segments the image layer
in view with a built-in model, a checkpoint or an exported file (in tiles above 2048 px), adds a
Labels layer whose ``features`` are the instance table of ``maskrcnn predict``, and fine-tunes the
model on labels corrected in napari; plus synthetic nuclei as sample data.

- ``napari.yaml``: the npe2 manifest (entry point ``napari.manifest`` in pyproject.toml)
- ``_widget.py``: the dock widget (Qt), which runs its jobs in napari worker threads
- ``_core.py``: what the jobs do, without Qt: segment an array, measure, fine-tune on layers
- ``_sample.py``: the sample data

This package imports nothing itself: napari reads the manifest without loading the widget.
"""
