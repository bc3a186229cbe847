"""How the compiled matcher sees its tables: through one int64 descriptor array.

numba passes a tuple of arrays to a function as the arrays' flattened members: the ~15 state
tables plus the event ring came to ~170 scalar arguments pushed on every call between the
matcher's helpers, more than the helpers' own work (measured with perf: a third of all
matcher time). Instead every compiled function takes one small int64 array, the descriptor,
holding each table's address and dimensions, and `table_view` turns a descriptor entry back
into a typed array inside the function, at the cost of two loads.

Helpers get the descriptor's address, one integer, rather than the descriptor array itself:
numba passes an array as its 7 struct words, which every call spilled to the stack and the
callee reloaded with wider moves (a failed store-to-load forwarding on each call, seen with
perf as the hottest instruction of several helpers).

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


def _c_array(context, builder, array_type, address, shape):
    """A C-contiguous array of array_type over the memory at `address` (an i64)."""
    item = context.get_data_type(array_type.dtype)
    itemsize = context.get_abi_sizeof(item)
    strides = []
    stride = ir.Constant(_I64, itemsize)
    for k in reversed(range(len(shape))):
        strides.insert(0, stride)
        stride = builder.mul(stride, shape[k])
    array = make_array(array_type)(context, builder)
    populate_array(array, data=builder.inttoptr(address, item.as_pointer()),
                   shape=shape, strides=strides,
                   itemsize=ir.Constant(_I64, itemsize), meminfo=None)
    return array._getvalue()


@intrinsic
def address_of(typingctx, array):
    """The data address of an array, as an int64 (the descriptor's, for the helpers)."""
    def codegen(context, builder, signature, args):
        data = make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, _I64)

    return types.int64(array), codegen


def descriptor_view(words: int):
    """A compiled accessor: descriptor address -> the descriptor as an int64 array of `words`."""
    array_type = types.Array(types.int64, 1, "C")

    @intrinsic
    def view(typingctx, desc):
        def codegen(context, builder, signature, args):
            return _c_array(context, builder, array_type, args[0], [ir.Constant(_I64, words)])

        return array_type(desc), codegen

    return view


def table_view(word: int, dtype, ndim: int):
    """A compiled accessor: descriptor address -> the C-contiguous array it describes at
    desc[word:word+1+ndim].

    desc[word] is the data address, desc[word + 1 + k] the size of dimension k.
    """
    array_type = types.Array(from_dtype(np.dtype(dtype)), ndim, "C")

    @intrinsic
    def view(typingctx, desc):
        def codegen(context, builder, signature, args):
            words = builder.inttoptr(args[0], _I64.as_pointer())

            def load(k):
                return builder.load(builder.gep(words, [ir.Constant(_I64, word + k)]))

            shape = [load(1 + k) for k in range(ndim)]
            return _c_array(context, builder, array_type, load(0), shape)

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
