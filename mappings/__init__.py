"""Pure domain code: machine samples in, production-order events out. No I/O, no clock reads."""
