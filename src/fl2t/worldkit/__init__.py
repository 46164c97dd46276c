"""Building and checking the tiny world: model shapes, training, the build, the gates, and `fl2t world`.

The world's data and shipped weights live below the library in `fl2t.world`; this package sits beside the
benchmark, since it trains models and runs methods."""
