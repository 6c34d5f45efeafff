B	typed_u64Z
ÿÿÿÿÿÿÿÿÿ