;; com.example.rot13: a library (ABI library-v1). Dependents import its functions by its package name:
;;   (import "com.example.rot13" "rot13" (func $rot13 (param i32) (result i32)))
;; It cannot be invoked on its own; it is linked into each call of a skill that depends on it.
(module
  ;; ROT13 of one byte: letters move 13 places round the alphabet, anything else is unchanged.
  (func (export "rot13") (param $c i32) (result i32)
    (local $base i32)
    (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 26))
      (then (local.set $base (i32.const 97)))
      (else
        (if (i32.lt_u (i32.sub (local.get $c) (i32.const 65)) (i32.const 26))
          (then (local.set $base (i32.const 65)))
          (else (return (local.get $c))))))
    (i32.add (local.get $base)
             (i32.rem_u (i32.add (i32.sub (local.get $c) (local.get $base)) (i32.const 13)) (i32.const 26))))
)
