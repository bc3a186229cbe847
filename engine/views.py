"""How the compiled matcher sees its tables: through one int64 descriptor array.

numba passes a tuple of arrays to a function as the arrays' flattened members: the ~15 state
tables plus the event ring came to ~170 scalar arguments pushed on every call between the
matcher's helpers, more than the helpers' own work (measured with perf: a third of all
matcher time). Instead every compiled function takes one small int64 array, the descriptor,
holding each table's address and dimensions, and `table_view` turns a descriptor entry back
into a typed array inside the function, at the cost of two loads.

The descriptor is built by engine/state.py (`descriptor()`) from arrays that the Python side
keeps alive; it never outlives them.
"""

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array
from numba.np.numpy_support import from_dtype

_I64 = ir.IntType(64)


def table_view(word: int, dtype, ndim: int):
    """A compiled accessor: desc -> the C-contiguous array described at desc[word:word+1+ndim].

    desc[word] is the data address, desc[word + 1 + k] the size of dimension k.
    """
    array_type = types.Array(from_dtype(np.dtype(dtype)), ndim, "C")

    @intrinsic
    def view(typingctx, desc):
        def codegen(context, builder, signature, args):
            words = make_array(signature.args[0])(context, builder, args[0]).data

            def load(k):
                return builder.load(builder.gep(words, [ir.Constant(_I64, word + k)]))

            item = context.get_data_type(array_type.dtype)
            itemsize = context.get_abi_sizeof(item)
            shape = [load(1 + k) for k in range(ndim)]
            strides = []
            stride = ir.Constant(_I64, itemsize)
            for k in reversed(range(ndim)):
                strides.insert(0, stride)
                stride = builder.mul(stride, shape[k])
            array = make_array(array_type)(context, builder)
            populate_array(array, data=builder.inttoptr(load(0), item.as_pointer()),
                           shape=shape, strides=strides,
                           itemsize=ir.Constant(_I64, itemsize), meminfo=None)
            return array._getvalue()

        return array_type(desc), codegen

    return view


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading array[index] into cache (llvm.prefetch, read, high locality).

    The matcher prefetches the index buckets of the commands a few places ahead in its batch,
    so their cache misses overlap with the work on the current command.
    """
    def codegen(context, builder, signature, args):
        ary = make_array(signature.args[0])(context, builder, args[0])
        item = context.get_data_type(signature.args[0].dtype)
        address = builder.gep(builder.bitcast(ary.data, item.as_pointer()), [args[1]])
        i32 = ir.IntType(32)
        bytes_ptr = ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [bytes_ptr], ir.FunctionType(ir.VoidType(), [bytes_ptr, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(address, ir.IntType(8).as_pointer()),
                          ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(array, index), codegen
