"""The fast path of tuneloop's own trainer (issue 7): packing, fused loss, compiled layers, memory planning.

Each module is imported where it is used (``from tuneloop.train.fast.packing import pack``); importing this
package has no side effects and pulls in no optional dependency.
"""
