"""Data: what a batch is, and how examples get from files to numpy batches keyed by modality.

- `contract`: the data contract (`ModalityInfo`, `DatasetInfo`, the modality kinds, `DatasetModule`).
- `input_pipeline`: TFDS array_record files read through grain into per-process batches; `PerRecordDataset`.
- `splits`, `corruption`: stratified splits; modality corruption for robustness studies.
- `common`, `custom_spec`, `custom_values`: code the builders share; the own-data spec and its readers.
- `datasets/`: one builder module per dataset (`config.data.name`).
"""
