"""`fl2t bench ...`: the continual benchmark (the field's metrics over task orders) and speed measurements."""
