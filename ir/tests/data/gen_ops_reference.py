# Regenerates ops_reference.txt: python gen_ops_reference.py (needs onnx and numpy).
import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
from onnx.reference import ReferenceEvaluator
import sys
DT={np.dtype('float32'):'f32',np.dtype('float64'):'f64',np.dtype('int32'):'i32',np.dtype('int64'):'i64',np.dtype('uint8'):'u8',np.dtype('bool'):'bool',np.dtype('int8'):'i8',np.dtype('uint64'):'u64',np.dtype('float16'):'f16'}
ONNXDT={'f32':1,'i64':7,'i32':6,'f16':10,'u8':2,'bool':9,'f64':11}
def tens(a):
    a=np.asarray(a); k=DT[a.dtype]
    vals=' '.join(repr(float(x)) if k in('f32','f64','f16') else str(int(x)) for x in a.flatten())
    return f"{k} {len(a.shape)} {' '.join(map(str,a.shape))} : {vals}".replace("  "," ")
cases=[]
def case(name, op, inputs, nout=1, **attrs):
    ins=[]; names=[]
    for i,x in enumerate(inputs):
        if x is None: names.append(''); continue
        names.append(f'i{i}'); ins.append((f'i{i}',np.asarray(x)))
    kattrs={}
    lines=[f"case {name}", f"op {op}"]
    for k,v in attrs.items():
        if isinstance(v,bool): v=int(v)
        if op=='EyeLike' and k=='dtype':
            lines.append(f"attr {k} str {v}"); kattrs[k]=ONNXDT[v]; continue
        if isinstance(v,int): lines.append(f"attr {k} int {v}")
        elif isinstance(v,float): lines.append(f"attr {k} float {v!r}")
        elif isinstance(v,str): lines.append(f"attr {k} str {v}")
        elif isinstance(v,list) and all(isinstance(z,int) for z in v): lines.append(f"attr {k} ints {' '.join(map(str,v))}")
        elif isinstance(v,np.ndarray): lines.append(f"attr {k} tensor {tens(v)}"); kattrs[k]=numpy_helper.from_array(v); continue
        kattrs[k]=v
    node=helper.make_node(op,names,[f'o{j}' for j in range(nout)],**kattrs)
    g=helper.make_graph([node],'g',[helper.make_tensor_value_info(n,helper.np_dtype_to_tensor_dtype(a.dtype),a.shape) for n,a in ins],[helper.make_tensor_value_info(f'o{j}',TensorProto.UNDEFINED,None) for j in range(nout)])
    m=helper.make_model(g,opset_imports=[helper.make_opsetid('',21)])
    outs=ReferenceEvaluator(m).run(None,{n:a for n,a in ins})
    for x in inputs: lines.append("input none" if x is None else "input "+tens(x))
    for o in outs: lines.append("output "+tens(o))
    cases.append('\n'.join(lines))
# ---- cases
f=lambda *s: np.arange(np.prod(s),dtype=np.float32).reshape(s)
I=lambda *v: np.array(v,dtype=np.int64)
x234=f(2,3,4)
case('shape_start_end_clamp','Shape',[x234],start=-2,end=10)
case('size_counts_elements','Size',[x234])
case('reshape_zero_copies_and_minus_one_infers','Reshape',[x234,I(0,-1)])
case('reshape_allowzero_keeps_zero','Reshape',[np.zeros((0,3),np.float32),I(3,0)],allowzero=1)
case('flatten_negative_axis','Flatten',[x234],axis=-1)
case('flatten_axis_zero','Flatten',[x234],axis=0)
case('squeeze_without_axes_drops_ones','Squeeze',[f(1,3,1,2)])
case('squeeze_negative_axis','Squeeze',[f(1,3,1,2),I(-2)])
case('unsqueeze_unsorted_axes','Unsqueeze',[f(3,2),I(3,0)])
case('transpose_default_reverses','Transpose',[x234])
case('transpose_perm','Transpose',[x234],perm=[1,0,2])
case('concat_negative_axis_i64','Concat',[I(1,2).reshape(1,2),I(3,4,5,6).reshape(2,2)],axis=-2)
case('split_num_outputs_uneven_last','Split',[f(7)],nout=3,num_outputs=3)
case('split_sizes_input_axis1','Split',[f(2,5),I(2,3)],nout=2,axis=1)
case('slice_negative_step_with_int64_sentinels','Slice',[x234,I(-1),I(np.iinfo(np.int64).min),I(2),I(-2)])
case('slice_clamps_out_of_range','Slice',[x234,I(1,-100),I(1000,2),I(0,2)])
case('slice_default_axes_steps','Slice',[f(5),I(1),I(4)])
case('expand_bidirectional','Expand',[f(3,1),I(2,1,4)])
case('tile_repeats','Tile',[f(2,2),I(2,3)])
case('pad_constant_value','Pad',[f(3,4),I(1,0,0,2),np.array(9.5,np.float32)],mode='constant')
case('pad_reflect','Pad',[f(3,4),I(2,3,1,2)],mode='reflect')
case('pad_edge_axes_input','Pad',[f(2,3),I(2,1),None,I(-1)],mode='edge')
case('pad_wrap','Pad',[f(2,3),I(1,4,3,2)],mode='wrap')
case('depth_to_space_dcr','DepthToSpace',[f(1,8,2,2)],blocksize=2)
case('depth_to_space_crd','DepthToSpace',[f(1,8,2,2)],blocksize=2,mode='CRD')
case('space_to_depth','SpaceToDepth',[f(1,2,4,4)],blocksize=2)
case('reverse_sequence_batch_axis0','ReverseSequence',[f(3,4),I(4,1,3)],batch_axis=0,time_axis=1)
case('gather_axis1_negative_indices_2d','Gather',[x234,I(-1,0,2,1).reshape(2,2)],axis=1)
case('gather_scalar_index','Gather',[x234,np.array(1,np.int32)],axis=2)
case('gather_elements_negative','GatherElements',[f(3,3),I(-1,0,1,2,0,-3).reshape(3,2)],axis=1)
case('gather_nd_batch_dims','GatherND',[x234,I(1,0,2,3).reshape(2,1,2)],batch_dims=1)
case('gather_nd_slices','GatherND',[x234,I(1,-1).reshape(2,1)])
case('scatter_elements_add_duplicates','ScatterElements',[f(2,3),I(0,0,2,1).reshape(2,2),np.array([[1,2],[3,4]],np.float32)],axis=1,reduction='add')
case('scatter_elements_max_negative','ScatterElements',[f(2,3),I(-1,0,1,-1).reshape(2,2),np.array([[10,-2],[3,40]],np.float32)],axis=1,reduction='max')
case('scatter_nd_mul','ScatterND',[f(3,2)+1,I(2,0).reshape(2,1),np.array([[2,3],[4,5]],np.float32)],reduction='mul')
case('scatter_nd_none_i32','ScatterND',[np.arange(6,dtype=np.int32).reshape(2,3),I(1,2,0,0).reshape(2,2),np.array([70,80],np.int32)])
case('one_hot_negative_index_axis0','OneHot',[I(0,-1,3,2),np.array(4,np.int64),np.array([0,7],np.int32)],axis=0)
case('one_hot_float_indices','OneHot',[np.array([[1.0,2.0]],np.float32),np.array(3.0,np.float32),np.array([-1,1],np.float32)])
case('non_zero_2d','NonZero',[np.array([[1,0,3],[0,0,2]],np.int32)])
case('compress_axis1','Compress',[x234,np.array([True,False,True])],axis=1)
case('compress_flattened_short_condition','Compress',[f(2,2),np.array([False,True,True])])
case('top_k_largest_ties_lower_index_first','TopK',[np.array([[1,3,3,2],[5,5,5,1]],np.float32),I(3)],nout=2)
case('top_k_smallest_axis0','TopK',[np.array([[1,3],[0,3],[2,1]],np.int64),I(2)],nout=2,axis=0,largest=0)
case('trilu_upper_k_negative','Trilu',[f(2,3,4),I(-1)])
case('trilu_lower_k_one','Trilu',[f(3,4),I(1)],upper=0)
case('constant_of_shape_default_f32_zero','ConstantOfShape',[I(2,3)])
case('constant_of_shape_int_value','ConstantOfShape',[I(3)],value=np.array([7],np.int32))
case('range_int_negative_delta','Range',[np.array(10,np.int32),np.array(1,np.int32),np.array(-3,np.int32)])
case('range_float','Range',[np.array(1.0,np.float32),np.array(2.0,np.float32),np.array(0.3,np.float32)])
case('range_empty','Range',[np.array(5,np.int64),np.array(1,np.int64),np.array(2,np.int64)])
case('eye_like_k_and_dtype','EyeLike',[np.zeros((3,4),np.int32)],k=1,dtype='f32')
case('eye_like_negative_k','EyeLike',[np.zeros((4,3),np.float32)],k=-2)
r=f(1,1,2,3)
case('resize_nearest_scales_half_pixel','Resize',[r,None,np.array([1,1,2,1.5],np.float32)],mode='nearest')
case('resize_nearest_sizes_asymmetric_ceil','Resize',[r,None,None,I(1,1,3,5)],mode='nearest',coordinate_transformation_mode='asymmetric',nearest_mode='ceil')
case('resize_linear_align_corners','Resize',[r,None,np.array([1,1,2,2],np.float32)],mode='linear',coordinate_transformation_mode='align_corners')
case('resize_linear_half_pixel_downsample','Resize',[f(1,1,4,4),None,np.array([1,1,0.6,0.6],np.float32)],mode='linear')
case('resize_linear_pytorch_half_pixel_axes','Resize',[f(1,1,4,4),None,None,I(3,1)],mode='linear',coordinate_transformation_mode='pytorch_half_pixel',axes=[2,3])
case('resize_cubic_exclude_outside','Resize',[f(1,1,4,4),None,np.array([1,1,1.5,0.8],np.float32)],mode='cubic',cubic_coeff_a=-0.5,exclude_outside=1)
case('resize_cubic_asymmetric','Resize',[f(1,1,3,3),None,np.array([1,1,2,2],np.float32)],mode='cubic',coordinate_transformation_mode='asymmetric')
case('resize_tf_crop_and_resize_extrapolation','Resize',[f(1,1,4,4),np.array([0,0,0.4,0.6,1,1,1.2,1.7],np.float32),None,I(1,1,3,3)],mode='linear',coordinate_transformation_mode='tf_crop_and_resize',extrapolation_value=10.0)
case('resize_sizes_not_larger','Resize',[f(1,1,2,4),None,None,I(7,8)],mode='nearest',axes=[2,3],keep_aspect_ratio_policy='not_larger')
case('resize_nearest_half_pixel_symmetric_u8','Resize',[np.arange(6,dtype=np.uint8).reshape(1,6),None,np.array([1,0.7],np.float32)],mode='nearest',coordinate_transformation_mode='half_pixel_symmetric')

import os
here = os.path.dirname(os.path.abspath(__file__))
open(os.path.join(here, 'ops_reference.txt'), 'w').write('# Generated with onnx 1.22 ReferenceEvaluator (opset 21); see ops_reference.rs.\n' + '\nend\n'.join(cases) + '\nend\n')
