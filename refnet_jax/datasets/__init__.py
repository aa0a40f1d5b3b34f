"""TFDS builders, one module per dataset (array_record, offline)."""
