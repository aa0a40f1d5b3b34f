"""TFDS builders, one module per dataset (array_record, offline), named by `config.data.name`.

The modules named in `HELPERS` are not datasets: they hold code that dataset modules share.
"""

HELPERS = ('common', 'custom_spec', 'custom_values')
