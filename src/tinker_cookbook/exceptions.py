"""The cookbook's errors, under one root.

```
TinkerCookbookError
├── ConfigurationError (also ValueError)   a bad config value or CLI argument; names the field
├── DataError (also ValueError)            a malformed dataset row or file; names the row
└── RendererError (also ValueError)        a message a renderer cannot render
```

Rollout failures inside an environment are not raised: they are kept as ``RolloutError``
values on the trajectory group (see ``tinker_cookbook.rl.types``), so one bad environment
does not fail a batch.
"""


class TinkerCookbookError(Exception):
    """Root of every error the cookbook raises on purpose."""


class ConfigurationError(TinkerCookbookError, ValueError):
    """A config value or command-line argument is invalid; the message names the field."""


class DataError(TinkerCookbookError, ValueError):
    """A dataset row or file is malformed; the message names the file, row and field."""


class RendererError(TinkerCookbookError, ValueError):
    """A renderer was asked for something it cannot render (e.g. no assistant message to train on)."""
