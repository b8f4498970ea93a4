"""Each private API of a library cnsq uses, behind one small module with the public path as
its fallback: a release that moves the private name costs time, never a wrong result.
setup.cfg bounds each such library below its next major release."""
