"""What a search leaves, read as results: an experiment collected once (its trials, the checkpoint that stands
for each, the best trial), the typed export record (best.yaml), the export's tables and plots, and warm starts
from earlier searches. The commands (export, compare, reproduce, export_adapter, search) stand on it; it imports
no command."""
