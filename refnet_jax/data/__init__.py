"""Data: what a batch is, and how examples get from files to numpy batches keyed by modality.

- `contract`: the data contract (`ModalityInfo`, `DatasetInfo`, the modality kinds, `DatasetModule`).
- `input_pipeline`: TFDS array_record files read through grain into per-process batches; `PerRecordDataset`.
- `splits`, `corruption`: stratified splits; modality corruption for robustness studies.
- `common`, `tokenizers`: code the builders share (images, word lists; subword tokenizers of text).
- `custom_spec`, `tables`, `custom_values`: the own-data spec, its table readers, and its values.
- `datasets/`: one builder module per dataset (`config.data.name`).
"""
