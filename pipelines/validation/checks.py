"""The Great Expectations expectation constructors the suites are written with.

Each returns one GE expectation named by ``meta["name"]`` (the name in our report); Great
Expectations is imported when one is built, not when this module is imported.
"""

from __future__ import annotations

import math
from typing import Any


def expect(name: str, kind: str, **kwargs: Any) -> Any:
    """GE expectation ``kind`` (a class name in ``gx.expectations``), named ``name``."""
    import great_expectations.expectations as gxe

    # meta names the check in our report; notes show the name in the Data Docs suite pages.
    return getattr(gxe, kind)(meta={"name": name}, notes=f"check: {name}", **kwargs)


def between(name: str, column: str, **bounds: Any) -> Any:
    """The column's values lie within ``bounds`` (GE's min_value, max_value, strict_*)."""
    return expect(name, "ExpectColumnValuesToBeBetween", column=column, **bounds)


def is_true(name: str, column: str) -> Any:
    """The (boolean) column is True wherever it is not null."""
    return expect(name, "ExpectColumnValuesToBeInSet", column=column, value_set=[True])


def required(table: str, column: str) -> Any:
    """``<table>_<column>_present``: the column is not null."""
    return expect(f"{table}_{column}_present", "ExpectColumnValuesToNotBeNull", column=column)


def unique(name: str, *columns: str) -> Any:
    """``columns`` are unique together within each split."""
    return expect(name, "ExpectCompoundColumnsToBeUnique", column_list=["split", *columns])


def same(name: str, column_a: str, column_b: str) -> Any:
    """The two columns are equal wherever both are given."""
    return expect(name, "ExpectColumnPairValuesToBeEqual", column_A=column_a,
                   column_B=column_b, ignore_row_if="either_value_is_missing")


def round_up(value: float) -> str:
    """``value`` rounded up to 3 decimals (a bound at least this large passes)."""
    return f"{math.ceil(value * 1000) / 1000:g}"
