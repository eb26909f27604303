"""The chat vector itself and what it does to a target: extraction, plans, apply (files and live models), merges, low-rank export."""
