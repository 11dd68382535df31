//! Handing the memory a pass freed back to the system.
//!
//! A pass over a thousand objects builds and drops megabytes of plans, observations and
//! serialized status. glibc's allocator keeps freed memory in its arenas for later allocations,
//! so an agent that sits idle between passes would hold its busiest moment's memory for ever.
//! After each pass the agent asks the allocator to return what is free; what is still in use
//! stays where it is.

/// Returns the allocator's free memory to the system (glibc's `malloc_trim`); nothing elsewhere.
pub fn give_back_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        #[allow(unsafe_code)]
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: `malloc_trim` takes no pointers and may be called at any time from any thread;
        // it only takes glibc's arena locks while it releases free pages.
        #[allow(unsafe_code)]
        unsafe {
            malloc_trim(0);
        }
    }
}
