//! [`Buf`]: a tensor's element storage. Either a `Vec` it owns, read-only elements that
//! clones share (a weight in a memory-mapped model file, used in place, or one loaded
//! once), or a writable region of an arena that this buffer alone uses while it lives
//! (the runtime's planned intermediate values).

use std::any::Any;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::ptr::NonNull;
use std::sync::Arc;

/// Something that keeps the memory behind a borrowed [`Buf`] alive.
pub type Owner = Arc<dyn Any + Send + Sync + RefUnwindSafe + UnwindSafe>;

/// Where a [`Buf`]'s elements live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A `Vec` the buffer owns.
    Owned,
    /// Read-only memory of a memory-mapped file. Writing copies the elements into an
    /// owned `Vec` first; a clone shares the memory.
    Mapped,
    /// A read-only `Vec` that clones share (a weight copied once out of its file).
    /// Writing copies it first.
    Shared,
    /// A writable region of an arena, used by this buffer alone while it lives. A clone
    /// is an owned copy, so the region is never shared.
    Region,
    /// Writable memory that this buffer alone uses and that goes back to a pool when the
    /// buffer is dropped (a graph output: the next run reuses the pages instead of
    /// faulting in fresh ones). Like an owned `Vec`, it may move from value to value.
    Pooled,
}

/// A tensor's elements: dereferences to `[T]` wherever they live (see [`Storage`]).
pub struct Buf<T> {
    repr: Repr<T>,
}

enum Repr<T> {
    Owned(Vec<T>),
    Borrowed {
        // Held only to keep `ptr..ptr + len` alive.
        _owner: Owner,
        ptr: NonNull<T>,
        len: usize,
        kind: Storage,
    },
}

// SAFETY: a borrowed buffer's memory is kept alive by its `Send + Sync` owner; a mapped one
// is never written, and a region is written only through `&mut Buf` (the creator of a
// region promises no other buffer or reference uses it while this one lives). So a `Buf`
// behaves like the `Vec<T>` it stands for.
unsafe impl<T: Send> Send for Buf<T> {}
// SAFETY: as above: `&Buf` only ever reads.
unsafe impl<T: Sync> Sync for Buf<T> {}

impl<T> Buf<T> {
    /// `len` read-only elements at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    /// `ptr` must be aligned for `T` and point to `len` initialised values of `T` that
    /// stay valid and unchanged for as long as `owner` lives.
    pub unsafe fn mapped(owner: Owner, ptr: *const T, len: usize) -> Buf<T> {
        Buf {
            repr: Repr::Borrowed {
                _owner: owner,
                ptr: NonNull::new(ptr.cast_mut()).unwrap_or(NonNull::dangling()),
                len,
                kind: Storage::Mapped,
            },
        }
    }

    /// Elements that every clone shares, read-only (writing copies them first).
    pub fn shared(v: Arc<Vec<T>>) -> Buf<T>
    where
        T: Send + Sync + RefUnwindSafe + UnwindSafe + 'static,
    {
        let (ptr, len) = (v.as_ptr(), v.len());
        // The elements of the Vec inside the Arc never move or change while the Arc lives
        // (nobody gets `&mut` to it while `_owner` holds a count): what `as_slice` needs.
        Buf {
            repr: Repr::Borrowed {
                _owner: v,
                ptr: NonNull::new(ptr.cast_mut()).unwrap_or(NonNull::dangling()),
                len,
                kind: Storage::Shared,
            },
        }
    }

    /// `len` writable elements at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    /// `ptr` must be aligned for `T` and point to `len` initialised values of `T` that stay
    /// valid for as long as `owner` lives, and nothing else may read or write them while
    /// the returned buffer lives.
    pub unsafe fn region(owner: Owner, ptr: *mut T, len: usize) -> Buf<T> {
        Buf {
            repr: Repr::Borrowed {
                _owner: owner,
                ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
                len,
                kind: Storage::Region,
            },
        }
    }

    /// `len` writable elements at `ptr` that `owner` returns to its pool when the last
    /// clone of `owner` goes.
    ///
    /// # Safety
    /// As [`Buf::region`]: aligned, initialised, valid while `owner` lives, and used by
    /// nothing else while the returned buffer lives.
    pub unsafe fn pooled(owner: Owner, ptr: *mut T, len: usize) -> Buf<T> {
        Buf {
            repr: Repr::Borrowed {
                _owner: owner,
                ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
                len,
                kind: Storage::Pooled,
            },
        }
    }

    /// Where the elements live.
    pub fn storage(&self) -> Storage {
        match &self.repr {
            Repr::Owned(_) => Storage::Owned,
            Repr::Borrowed { kind, .. } => *kind,
        }
    }

    /// The elements as a slice.
    pub fn as_slice(&self) -> &[T] {
        match &self.repr {
            Repr::Owned(v) => v,
            // SAFETY: the constructors' contracts: aligned, initialised, alive with the owner.
            Repr::Borrowed { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }
}

impl<T: Clone> Buf<T> {
    /// The elements as an owned `Vec` (no copy if they are owned already).
    pub fn into_vec(self) -> Vec<T> {
        match self.repr {
            Repr::Owned(v) => v,
            Repr::Borrowed { .. } => self.as_slice().to_vec(),
        }
    }

    /// The owned `Vec`, copying borrowed elements into one first (for growing or
    /// shrinking the buffer).
    pub fn vec_mut(&mut self) -> &mut Vec<T> {
        if let Repr::Borrowed { .. } = self.repr {
            self.repr = Repr::Owned(self.as_slice().to_vec());
        }
        match &mut self.repr {
            Repr::Owned(v) => v,
            Repr::Borrowed { .. } => unreachable!("made owned above"),
        }
    }

    /// The elements as a mutable slice; mapped elements are copied into an owned `Vec`
    /// first, a region is written in place.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        if matches!(self.storage(), Storage::Mapped | Storage::Shared) {
            self.vec_mut();
        }
        match &mut self.repr {
            Repr::Owned(v) => v,
            // SAFETY: only a region or pooled memory is left borrowed here, and their
            // constructors' contracts say nothing else uses it while `self` lives;
            // `&mut self` is unique.
            Repr::Borrowed { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
        }
    }
}

impl<T> Default for Buf<T> {
    fn default() -> Self {
        Buf {
            repr: Repr::Owned(Vec::new()),
        }
    }
}

impl<T> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf {
            repr: Repr::Owned(v),
        }
    }
}

impl<T> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Clone> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

impl<T: Clone> Clone for Buf<T> {
    fn clone(&self) -> Self {
        match &self.repr {
            Repr::Owned(v) => v.clone().into(),
            Repr::Borrowed {
                _owner,
                ptr,
                len,
                kind: kind @ (Storage::Mapped | Storage::Shared),
            } => Buf {
                repr: Repr::Borrowed {
                    _owner: _owner.clone(),
                    ptr: *ptr,
                    len: *len,
                    kind: *kind,
                },
            },
            Repr::Borrowed { .. } => self.as_slice().to_vec().into(),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl<T: PartialEq> PartialEq for Buf<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: PartialEq> PartialEq<Vec<T>> for Buf<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T> FromIterator<T> for Buf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(it: I) -> Self {
        Vec::from_iter(it).into()
    }
}

impl<T: Clone> IntoIterator for Buf<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.into_vec().into_iter()
    }
}

impl<'a, T> IntoIterator for &'a Buf<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl<'a, T: Clone> IntoIterator for &'a mut Buf<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_mut_slice().iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing() -> (Arc<Vec<f32>>, *mut f32) {
        let v: Arc<Vec<f32>> = Arc::new(vec![1.0, 2.0, 3.0, 4.0]);
        let p = v.as_ptr().cast_mut();
        (v, p)
    }

    #[test]
    fn mapped_reads_in_place_and_copies_on_write() {
        let (owner, p) = backing();
        // SAFETY: four f32s, alive with `owner`, never written through the Arc.
        let mut b = unsafe { Buf::mapped(owner.clone(), p, 3) };
        assert_eq!(b.storage(), Storage::Mapped);
        assert_eq!(b.as_ptr(), p.cast_const());
        let c = b.clone();
        assert_eq!(c.storage(), Storage::Mapped, "a clone shares the mapping");
        b[0] = 9.0;
        assert_eq!(b.storage(), Storage::Owned);
        assert_eq!(&b[..], &[9.0, 2.0, 3.0]);
        assert_eq!(&c[..], &[1.0, 2.0, 3.0], "the mapped memory is unchanged");
    }

    #[test]
    fn a_region_is_written_in_place_and_cloned_by_copy() {
        let (owner, p) = backing();
        // SAFETY: nothing else touches the Vec's elements while `b` lives.
        let mut b = unsafe { Buf::region(owner.clone(), p.wrapping_add(1), 2) };
        b[1] = 7.0;
        assert_eq!(b.storage(), Storage::Region);
        let c = b.clone();
        assert_eq!(c.storage(), Storage::Owned);
        assert_eq!(&c[..], &[2.0, 7.0]);
        drop(b);
        assert_eq!(owner.as_slice(), &[1.0, 2.0, 7.0, 4.0]);
    }

    #[test]
    fn shared_clones_share_until_written() {
        let a = Buf::shared(Arc::new(vec![1u8, 2, 3]));
        let mut b = a.clone();
        assert_eq!(
            (a.storage(), b.storage()),
            (Storage::Shared, Storage::Shared)
        );
        assert_eq!(a.as_ptr(), b.as_ptr());
        b[2] = 0;
        assert_eq!(b.storage(), Storage::Owned);
        assert_eq!((&a[..], &b[..]), (&[1u8, 2, 3][..], &[1u8, 2, 0][..]));
    }

    #[test]
    fn into_vec_and_collect() {
        let b: Buf<i32> = (0..4).collect();
        assert_eq!(b.storage(), Storage::Owned);
        assert_eq!(b.clone().into_vec(), vec![0, 1, 2, 3]);
        assert_eq!(b.into_iter().sum::<i32>(), 6);
    }
}
