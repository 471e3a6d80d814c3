"""Fold, after exporting, the ops a contrib operator's translation writes to repack weights (the
uint8 codes and block scales of ``MatMulNBits``, ``kernels/int8_linear/onnx_translation.py``),
so that the file stores the packed weights as initializers named after the originals. Only
those ops are folded: the int8 weights of standard-op linears stay int8 (folding their
``DequantizeLinear`` would store float weights)."""

from __future__ import annotations

from typing import Any


def fold_weight_packing(model: Any) -> None:
    """Fold, in place, the ops that repack initializers into a contrib operator's weight inputs
    (the uint8 codes and block scales of ``MatMulNBits``), so that the file stores them packed;
    no other constant is folded (the int8 weights of standard-op linears stay int8)."""
    import onnxscript.optimizer  # the optional onnx extra: imported when exporting

    constant: dict[int, bool] = {}

    def is_constant(value: Any) -> bool:  # an initializer, or computed from initializers only
        if value is None or value.is_initializer():
            return True
        producer = value.producer()
        if producer is None:  # a graph input
            return False
        if id(producer) not in constant:
            constant[id(producer)] = all(is_constant(v) for v in producer.inputs)
        return constant[id(producer)]

    packing, names = set(), []
    for node in model.graph:
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            for index, suffix in ((1, "matmulnbits_codes"), (2, "matmulnbits_scales")):
                roots, stack = [], [node.inputs[index]] if is_constant(node.inputs[index]) else []
                while stack:
                    value = stack.pop()
                    producer = value.producer()
                    if value.is_initializer():
                        roots.append(value.name)
                    elif producer is not None and producer not in packing:
                        packing.add(producer)
                        stack.extend(v for v in producer.inputs if v is not None)
                if len(roots) == 1:
                    names.append((node, index, f"{roots[0]}.{suffix}"))
    if packing:
        onnxscript.optimizer.fold_constants(model, input_size_limit=2**62,
                                            output_size_limit=2**62,
                                            should_fold=lambda node: node in packing)
        onnxscript.optimizer.remove_unused_nodes(model)
    for node, index, name in names:  # the packed initializers named after the weights
        value = node.inputs[index]
        if value.is_initializer() and name not in model.graph.initializers:
            value.name = name
