"""``montessori bench ...``: side-by-side timings, machine info, JSON. Imported by nothing but
the CLI."""
