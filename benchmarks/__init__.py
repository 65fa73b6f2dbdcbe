"""clipscale's benchmark suite behind docs/benchmarks.md; run from the repository root, e.g.
`python -m benchmarks.loader --out loader.json`. Not part of the installed package: the user-facing
entry points are `clipscale bench loader|step`."""
