"""The teaching layer: exercises with checks, widgets, the demo's report and the demo."""
