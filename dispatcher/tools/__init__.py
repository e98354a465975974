"""Tools that drive a whole daemon from outside: the chaos harness."""
