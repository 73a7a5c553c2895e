"""What prediction writes: label images, tables, overlays, COCO/Kaggle RLEs, Fiji ROIs and QuPath GeoJSON."""
