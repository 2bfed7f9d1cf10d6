"""Weight conversion: regex name mapping, tensor layout transforms, strict plans, export."""

from converters.engine import ConversionError, ConversionPlan, LeafSpec, build_plan, export_params
from converters.mapping import MappedName, NameMapper

__all__ = ["ConversionError", "ConversionPlan", "LeafSpec", "MappedName", "NameMapper", "build_plan", "export_params"]
