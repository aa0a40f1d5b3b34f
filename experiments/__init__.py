"""The result grids behind the tables of docs/ (results.md and the pages it links): each a script run by path
from anywhere, e.g. `python experiments/tables.py easy_vqa`, that runs every cell as its own process and
records it under results/ (`refnet_jax.analysis.report.run_and_record`), so that an interrupted grid resumes
where it stopped.

tables.py and label_efficiency.py import only the installed library, so they also import as
`experiments.<name>` (the tests do). graph_analysis.py reads the label-efficiency study's pre-training runs
from its sibling `label_efficiency`, which a script run by path finds beside itself.
"""
